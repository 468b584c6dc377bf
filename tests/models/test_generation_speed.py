"""The static-cache (and compiled) decoding paths give the dynamic path's tokens, and HF ``generate``'s."""

from __future__ import annotations

import pytest
import torch

from rrg3d.models.config import GenerationSettings
from rrg3d.models.generation import decode
from rrg3d.models.language import IMAGE_TOKEN
from rrg3d.models.vlm import ReportGenerator

pytest.importorskip("transformers")

INSTRUCTIONS = [None, IMAGE_TOKEN + "\nDescribe the lungs, the mediastinum, the heart and the pleura of this chest CT "
                                    "in one sentence each, then give a short impression."]


@pytest.fixture(scope="module")
def model() -> ReportGenerator:
    return ReportGenerator.from_config("tiny_ctvit_v", seed=0).eval()


@pytest.fixture(scope="module")
def inputs(model: ReportGenerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded spliced embeddings and mask of two volumes with prompts of different length."""
    volumes = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        visual = model.vision(volumes)
        batch = model.prompt_batch(visual.shape[1], 2, INSTRUCTIONS)
        embeds = model.embed(batch["input_ids"], visual=visual)
    assert batch["attention_mask"][0, 0] == 0, "prompts of different length are left-padded"
    return embeds, batch["attention_mask"]


def run(model: ReportGenerator, inputs: tuple[torch.Tensor, torch.Tensor], settings: GenerationSettings,
        eos: bool = True, **kwargs: object) -> torch.Tensor:
    embeds, mask = inputs
    return decode(model.lm, embeds, mask, settings, eos_ids=model.eos_ids if eos else (),
                  pad_id=int(model.tokenizer.pad_token_id), suppress_ids=model.suppress_ids, **kwargs)


def test_static_cache_greedy_equals_hf_generate_and_the_dynamic_path(model, inputs):
    settings = GenerationSettings(max_new_tokens=16)
    embeds, mask = inputs
    with torch.inference_mode():
        reference = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                      eos_token_id=model.eos_ids, pad_token_id=model.tokenizer.pad_token_id,
                                      suppress_tokens=model.suppress_ids)
    dynamic = run(model, inputs, settings)
    static = run(model, inputs, settings, cache="static")
    assert torch.equal(static, dynamic)
    assert torch.equal(static, reference[:, : static.shape[1]])


def test_static_cache_drops_finished_rows_like_the_dynamic_path(model, inputs):
    # the first row's third token is made its end-of-sequence, so it finishes while the other row goes on
    settings = GenerationSettings(max_new_tokens=10)
    free = run(model, inputs, settings, eos=False)
    embeds, mask = inputs
    eos = [int(free[0, 2])]
    assert int(free[1, 2]) != eos[0] and eos[0] not in free[1].tolist(), "the rows must finish at different steps"
    kwargs = {"eos_ids": eos, "pad_id": int(model.tokenizer.pad_token_id), "suppress_ids": model.suppress_ids}
    dynamic = decode(model.lm, embeds, mask, settings, **kwargs)
    static = decode(model.lm, embeds, mask, settings, cache="static", **kwargs)
    assert torch.equal(static, dynamic)
    assert (static[0, 3:] == int(model.tokenizer.pad_token_id)).all() and torch.equal(static[1], free[1])


def test_static_cache_samples_penalties_and_num_samples_match_the_dynamic_path(model, inputs):
    for settings, samples in ((GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=3), 3),
                              (GenerationSettings(max_new_tokens=8, repetition_penalty=1.3), 1)):
        dynamic = run(model, inputs, settings, num_samples=samples)
        assert torch.equal(run(model, inputs, settings, num_samples=samples, cache="static"), dynamic)
    with pytest.raises(ValueError, match="cache"):
        run(model, inputs, GenerationSettings(max_new_tokens=2), cache="paged")


@pytest.mark.slow
def test_compiled_decoding_equals_the_dynamic_path(model, inputs):
    settings = GenerationSettings(max_new_tokens=10)
    free = run(model, inputs, settings, eos=False)
    embeds, mask = inputs
    kwargs = {"eos_ids": [int(free[0, 2])], "pad_id": int(model.tokenizer.pad_token_id),
              "suppress_ids": model.suppress_ids}
    assert torch.equal(decode(model.lm, embeds, mask, settings, compile=True, **kwargs),
                       decode(model.lm, embeds, mask, settings, **kwargs))
    sampled = GenerationSettings(max_new_tokens=10, temperature=1.0, seed=5)
    assert torch.equal(decode(model.lm, embeds, mask, sampled, compile=True, num_samples=2, **kwargs),
                       decode(model.lm, embeds, mask, sampled, num_samples=2, **kwargs))

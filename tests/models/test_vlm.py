"""The report generator: configs, the image-token splice, label masking, decoding, LoRA and checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch

from rrg3d.errors import ConfigError
from rrg3d.models.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from rrg3d.models.config import GenerationSettings, list_model_configs, load_model_config
from rrg3d.models.generation import apply_repetition_penalty, filter_top_k_top_p
from rrg3d.models.language import IMAGE_TOKEN
from rrg3d.models.vlm import IGNORE_INDEX, ReportGenerator, VisionTower, check_labels, splice_visual

pytest.importorskip("transformers")

GREEDY = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def model() -> ReportGenerator:
    return ReportGenerator.from_config("tiny_ctvit_v", seed=0).eval()


@pytest.fixture(scope="module")
def volumes() -> torch.Tensor:
    return torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))


# -- configs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_model_configs())
def test_every_shipped_config_builds(name):
    from rrg3d.preprocess.presets import load_preset

    config = load_model_config(name)
    tower = VisionTower.from_config(config.vision, lm_dim=64)
    preset = load_preset(config.preprocess)
    shape, channels = preset.shape, preset.channels
    tokens = tower.num_tokens(shape)
    assert tokens > 0
    if name.startswith(("tiny_", "small_")):  # test-size and learnability-size configs: run them
        x = torch.rand(1, channels, *shape)
        fitting = torch.rand(4, channels, *shape, generator=torch.Generator().manual_seed(1))
        tower.fit_statistics(lambda: [fitting])  # a PCA compressor, a standardising projector
        assert tower.unfitted_parts() == []
        assert tower(x).shape == (1, tokens, 64)
    else:
        assert f"tiny_{name}" in list_model_configs(), "every full-size architecture has a tiny sibling"
        if config.vision.branches:  # PETRG-3D: 128 CT + 128 PET tokens
            assert tokens == 256
        elif config.vision.regions is None:  # region-guided models add their region tokens to a smaller global set
            assert tokens == 512  # the other shipped full-size architectures all give 512 visual tokens


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nvision: {encoder: {name: vit3d, no_such_key: 1}}\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        VisionTower.from_config(load_model_config(bad).vision, lm_dim=8)
    bad.write_text("name: x\nvision: {encoder: {name: vit3d}}\nprompt: {instruction: no placeholder}\n")
    with pytest.raises(ConfigError, match="<image>"):
        load_model_config(bad)
    with pytest.raises(ConfigError, match="not a file"):
        load_model_config("no_such_architecture")
    with pytest.raises(ConfigError, match="temperature 0"):
        GenerationSettings(num_beams=2, temperature=0.7)


# -- splice and labels ----------------------------------------------------------------------------------------------
def test_prompt_expands_image_token_to_the_visual_count(model):
    n = model.num_image_tokens((32, 64, 64))
    assert n == 64
    ids = model.prompt_ids(n)
    assert ids.count(model.image_token_id) == n
    assert IMAGE_TOKEN not in model.tokenizer.decode([i for i in ids if i != model.image_token_id])


def test_splice_replaces_exactly_the_image_embeddings_and_checks_counts():
    ids = torch.tensor([[5, 9, 9, 6], [9, 9, 7, 8]])
    embeddings = torch.zeros(2, 4, 3)
    visual = torch.arange(12, dtype=torch.float).reshape(2, 2, 3) + 1
    out = splice_visual(embeddings, ids, visual, image_token_id=9)
    assert torch.equal(out[0, 1:3], visual[0]) and torch.equal(out[1, :2], visual[1])
    assert torch.equal(out[0, [0, 3]], torch.zeros(2, 3)) and torch.equal(out[1, 2:], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sample 1: 1"):
        splice_visual(embeddings, torch.tensor([[5, 9, 9, 6], [9, 1, 7, 8]]), visual, image_token_id=9)
    with pytest.raises(ValueError, match="dim"):
        splice_visual(embeddings, ids, visual[..., :2], image_token_id=9)


def test_forward_raises_when_prompt_and_input_size_disagree(model, volumes):
    batch = model.training_batch(["Normal."] * 2, num_image_tokens=model.num_image_tokens((32, 64, 64)) - 1)
    with pytest.raises(ValueError, match="token count does not match"):
        model(volumes, **batch)


def test_labels_cover_report_tokens_only(model):
    n = model.num_image_tokens((32, 64, 64))
    reports = ["No acute findings.", "A 6 mm nodule in the right upper lobe. Mild emphysema."]
    batch = model.training_batch(reports, n)
    prompt_len = len(model.prompt_ids(n))
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert (labels[:, :prompt_len] == IGNORE_INDEX).all(), "prompt and image tokens carry no loss"
    assert not (labels == model.image_token_id).any()
    for row, report in enumerate(reports):
        target = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert model.tokenizer.decode(target) == report + model.end_of_turn
        assert (labels[row][mask[row] == 0] == IGNORE_INDEX).all(), "padding carries no loss"
        assert torch.equal(ids[row][labels[row] != IGNORE_INDEX], labels[row][labels[row] != IGNORE_INDEX])


def test_no_sample_silently_loses_all_labels(model):
    n = model.num_image_tokens((32, 64, 64))
    with pytest.raises(ValueError, match="empty"):
        model.training_batch(["Normal.", "  "], n, ids=["a", "b"])
    with pytest.raises(ValueError, match="fills max_length"):
        model.training_batch(["Normal."], n, max_length=len(model.prompt_ids(n)))
    truncated = model.training_batch(["Normal lungs. " * 20], n, max_length=len(model.prompt_ids(n)) + 3)
    assert int((truncated["labels"] != IGNORE_INDEX).sum()) == 3
    with pytest.raises(ValueError, match="study-7"):
        check_labels(torch.full((2, 4), IGNORE_INDEX), ["study-3", "study-7"])


def test_loss_trains_vision_and_lora_only(model, volumes):
    model.set_trainable(encoder=True, projector=True, lm="lora")
    counts = model.trainable_parameters()
    assert counts["encoder"] > 0 and counts["projector"] > 0 and counts["lm"] > 0
    assert all("lora_" in n for n, p in model.lm.named_parameters() if p.requires_grad)
    batch = model.training_batch(["Normal.", "Effusion."], model.num_image_tokens((32, 64, 64)))
    model.train()
    loss = model(volumes, **batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.vision.projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.encoder.parameters())
    assert all(p.grad is None for n, p in model.lm.named_parameters() if "lora_" not in n)
    model.zero_grad(set_to_none=True)
    model.set_trainable(encoder=False, projector=False, lm="frozen")
    assert sum(model.trainable_parameters().values()) == 0
    model.eval()


def test_lora_target_modules_are_configurable_and_checked():
    from rrg3d.models.language import LoraSettings, add_lora

    config = load_model_config("tiny_vit3d")
    config.lm.lora = LoraSettings(r=2, alpha=4, target_modules=("gate_proj",))
    model = ReportGenerator.from_config(config)
    names = [n for n, _ in model.lm.named_parameters() if "lora_A" in n]
    assert names and all("gate_proj" in n for n in names)
    with pytest.raises(ConfigError, match="target_modules"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft warns about wrapping an already-wrapped model
        add_lora(model.lm.get_base_model(), LoraSettings(target_modules=("no_such_layer",)))


# -- decoding -------------------------------------------------------------------------------------------------------
def test_greedy_equals_hf_generate_with_left_padding(model, volumes):
    ours = model.generate_ids(volumes, GREEDY)
    visual = model.vision(volumes)
    instructions = [None, IMAGE_TOKEN + "\nDescribe the lungs, the mediastinum, the heart and the pleura of this chest "
                                        "CT in one sentence each, then give a short impression."]
    batch = model.prompt_batch(visual.shape[1], 2, instructions)
    assert batch["attention_mask"][0, 0] == 0, "prompts of different length are left-padded"
    with torch.inference_mode():
        embeds = model.embed(batch["input_ids"], visual=visual)
        reference = model.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                      max_new_tokens=12, do_sample=False, eos_token_id=model.eos_ids,
                                      pad_token_id=model.tokenizer.pad_token_id, suppress_tokens=model.suppress_ids)
        mixed = model.generate_ids(volumes, GREEDY, instructions)
    assert torch.equal(mixed, reference[:, : mixed.shape[1]])
    single = model.generate_ids(volumes[1:], GREEDY, instructions[1:])
    assert torch.equal(mixed[1, : single.shape[1]], single[0]), "a left-padded row decodes as it does alone"
    assert torch.equal(ours[0, : mixed.shape[1]], mixed[0, : ours.shape[1]][: ours.shape[1]])
    assert not torch.isin(ours, torch.tensor(model.suppress_ids)).any(), "special tokens are never generated"


def test_sampling_is_seeded_and_beam_search_runs(model, volumes):
    sample = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first, second = model.generate_ids(volumes, sample), model.generate_ids(volumes, sample)
    assert torch.equal(first, second)
    beams = model.generate(volumes[:1], GenerationSettings(max_new_tokens=8, num_beams=2))
    assert len(beams) == 1 and isinstance(beams[0], str)


def test_samples_share_one_prefill_and_are_seeded(model, volumes):
    greedy = model.generate_ids(volumes, GREEDY)
    repeated = model.generate_ids(volumes, GREEDY, num_samples=3)
    assert repeated.shape[0] == 6
    for row in range(6):  # greedy continuations of a shared prefill are the prompt's own greedy report
        expected = greedy[row // 3]
        width = min(expected.shape[0], repeated.shape[1])
        assert torch.equal(repeated[row, :width], expected[:width])
    sample = GenerationSettings(max_new_tokens=8, temperature=1.0, seed=3)
    drawn = model.sample_reports(volumes, 4, sample)
    assert len(drawn) == 2 and all(len(group) == 4 for group in drawn)
    assert drawn == model.sample_reports(volumes, 4, sample)
    assert len(set(drawn[0])) > 1, "samples of one prompt differ"
    with pytest.raises(ValueError, match="num_samples"):
        model.sample_reports(volumes, 0, sample)


def test_logit_processors_match_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    generated = torch.tensor([[1, 2, 2], [0, 49, 7], [3, 3, 3]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(generated, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, generated, 1.3), expected)
    ours = filter_top_k_top_p(logits, top_p=0.8)
    theirs = TopPLogitsWarper(0.8)(generated, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert (torch.isfinite(filter_top_k_top_p(logits, top_k=5)).sum(-1) == 5).all()


# -- checkpoints ----------------------------------------------------------------------------------------------------
def test_save_load_adapter_checkpoint_gives_identical_greedy_output(model, volumes, tmp_path):
    before = model.generate_ids(volumes, GREEDY)
    path = save_checkpoint(model, tmp_path / "ckpt")
    meta = read_manifest(path)
    assert meta["lm"]["weights"] == "adapter" and meta["lm"]["base"] == "smollm2-135m-instruct"
    assert meta["preprocess"]["preset"] == "tiny" and meta["preprocess"]["config"]["shape"] == [32, 64, 64]
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.generate_ids(volumes, GREEDY), before)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_full_and_base_checkpoints_round_trip_with_fitted_pca(volumes, tmp_path):
    model = ReportGenerator.from_config("tiny_vit3d", seed=1).eval()
    with pytest.raises(RuntimeError, match="fit"):
        model.generate_ids(volumes, GREEDY)
    model.vision.compressor.fit(model.vision.encoder(torch.rand(6, 1, 32, 64, 64)).detach())
    assert read_manifest(save_checkpoint(model, tmp_path / "base"))["lm"]["weights"] == "base"
    before = model.generate_ids(volumes, GREEDY)
    assert torch.equal(load_checkpoint(tmp_path / "base").generate_ids(volumes, GREEDY), before)
    model.set_trainable(encoder=False, lm="full")
    with torch.no_grad():
        model.lm.model.norm.weight.mul_(1.5)  # a "fine-tuned" LM
    changed = model.generate_ids(volumes, GREEDY)
    with pytest.raises(ValueError, match="drop trained"):
        save_checkpoint(model, tmp_path / "x", lm_weights="base")
    path = save_checkpoint(model, tmp_path / "full")
    assert read_manifest(path)["lm"]["weights"] == "full"
    assert torch.equal(load_checkpoint(path).generate_ids(volumes, GREEDY), changed)


def test_checkpoint_problems_are_reported_clearly(model, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no rrg3d\.yaml"):
        load_checkpoint(tmp_path / "empty")
    path = save_checkpoint(model, tmp_path / "ckpt")
    meta_file = path / "rrg3d.yaml"
    original = meta_file.read_text()
    meta_file.write_text(original.replace("format_version: 1", "format_version: 99"))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)
    meta_file.write_text(original.replace("weights: adapter", "weights: full"))
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(path)
    meta_file.write_text(original)
    data = bytearray((path / "vision.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "vision.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    save_checkpoint(model, path)  # overwriting swaps in a complete new checkpoint
    assert read_manifest(path)["lm"]["weights"] == "adapter"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folders left behind"


def test_merged_lora_decodes_like_the_adapter(model, volumes, tmp_path):
    with torch.no_grad():  # a non-zero adapter, so that merging has something to fold in
        for name, parameter in model.lm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    path = save_checkpoint(model, tmp_path / "ckpt")
    adapter, merged = load_checkpoint(path), load_checkpoint(path, merge_lora=True)
    assert not hasattr(merged.lm, "peft_config")
    batch = adapter.prompt_batch(64, 2)
    with torch.inference_mode():
        logits_a = adapter(volumes, **batch).logits
        logits_m = merged(volumes, **batch).logits
    assert torch.allclose(logits_a, logits_m, atol=1e-4)
    assert torch.equal(adapter.generate_ids(volumes, GREEDY), merged.generate_ids(volumes, GREEDY))
    with pytest.raises(ValueError, match="merged"):
        save_checkpoint(merged, tmp_path / "again")
    with torch.no_grad():
        for name, parameter in model.lm.named_parameters():
            if "lora_B" in name:
                parameter.zero_()

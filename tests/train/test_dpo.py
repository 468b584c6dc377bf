"""DPO end to end on tiny phantoms: ``rrg3d prefs build`` on a tiny SFT checkpoint, then ``rrg3d train tiny_dpo``.

Checked: the builder's files, resume and failure records; the loss is ln 2 at the first step (the policy is the
reference); the reference log-probs are the SFT checkpoint's and do not change while training; a few steps raise the
margin on fixed pairs; resume continues bit for bit; the stage's refusals."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rrg3d.cli import main
from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.train import train
from rrg3d.train.loop import TrainingInterrupted, trainable_state

pytest.importorskip("transformers")

QUICK = ["train.threads=1", "train.progress=false", "train.tensorboard=false"]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, base_overrides):
    """A tiny LoRA SFT checkpoint (4 steps: it writes poor reports, which is what a judge needs to tell apart)."""
    run = tmp_path_factory.mktemp("dpo_sft") / "sft"
    result = train("tiny_sft", [*base_overrides, "data.max_length=160", "data.max_val_samples=1",
                                "train.save_every=0", f"run_dir={run}"])
    return result.final


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, phantoms, cache_dir, sft_checkpoint):
    """Best-worst pairs of the 6 training phantoms (3 samples of 24 tokens each): the reference is chosen where no
    sample reaches the threshold, so pairs exist even for a model this poor."""
    out = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    args = ["prefs", "build", str(phantoms), "--model", str(sft_checkpoint), "--out", str(out), "--samples", "3",
            "--max-new-tokens", "24", "--strategy", "best-worst", "--cache-dir", str(cache_dir), "--no-progress"]
    assert main([*args, "--limit", "2"]) in (0, 1)
    candidates = _jsonl(f"{out}.candidates.jsonl")
    assert len(candidates) == 2
    assert main(args) == 0
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["studies"] == 6 and summary["resumed"] == 2 and summary["sampled"] == 4 and not summary["failed"]
    assert summary["pairs"] + sum(summary["dropped"].values()) == 6 and summary["pairs"] >= 2
    assert sum(summary["score_histogram"].values()) == 18
    return out


def test_prefs_build_writes_pairs_of_training_studies_only(pairs, phantoms):
    records = _jsonl(pairs)
    train_ids = {r["id"] for r in _jsonl(phantoms) if r["split"] == "train"}
    for pair in records:
        assert pair["id"] in train_ids and pair["split"] == "train" and pair["strategy"] == "best-worst"
        assert pair["judge"].startswith("label:") and len(pair["candidates"]) == len(pair["scores"]) == 3
        assert pair["rejected_score"] == min(s for s in pair["scores"] if s is not None)
        assert pair["chosen_score"] > pair["rejected_score"] and pair["chosen"] != pair["rejected"]
        if pair["chosen_index"] is None:
            assert pair["chosen"] == pair["reference"] and max(pair["scores"]) < 3
    # sampling is seeded per study: a fresh run draws the same candidates
    first = _jsonl(f"{pairs}.candidates.jsonl")
    assert len({r["id"] for r in first}) == 6 and all(r["settings"] == first[0]["settings"] for r in first)


def test_prefs_build_refuses_held_out_splits_and_records_failures(tmp_path, phantoms, sft_checkpoint):
    out = tmp_path / "pairs.jsonl"
    base = ["prefs", "build", str(phantoms), "--model", str(sft_checkpoint), "--out", str(out), "--no-progress"]
    assert main([*base, "--split", "test"]) == 2 and not out.exists()
    # a truncated volume: the study is recorded as failed, the others go on
    copy = tmp_path / "phantoms"
    shutil.copytree(phantoms.parent, copy)
    records = _jsonl(copy / "manifest.jsonl")
    broken = next(r for r in records if r["split"] == "train")
    volume = copy / broken["images"]["ct"]
    volume.write_bytes(volume.read_bytes()[:200])
    args = ["prefs", "build", str(copy / "manifest.jsonl"), "--model", str(sft_checkpoint), "--out", str(out),
            "--samples", "2", "--max-new-tokens", "4", "--limit", "3", "--strategy", "best-worst", "--no-progress"]
    main(args)
    errors = _jsonl(f"{out}.errors.jsonl")
    assert [e["id"] for e in errors] == [broken["id"]] and str(volume.name) in errors[0]["error"]
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["failed"] == 1 and summary["sampled"] == 2
    # the settings are part of the candidates file: another temperature is refused, not mixed in
    assert main([*args, "--temperature", "0.7"]) == 2


def test_prefs_build_skips_the_studies_a_classifier_was_fitted_on(tmp_path, phantoms, sft_checkpoint, cache_dir):
    out = tmp_path / "pairs.jsonl"
    base = ["prefs", "build", str(phantoms), "--model", str(sft_checkpoint), "--out", str(out), "--samples", "2",
            "--max-new-tokens", "4", "--cache-dir", str(cache_dir), "--no-progress"]
    train_ids = [r["id"] for r in _jsonl(phantoms) if r["split"] == "train"]
    assert main([*base, "--skip", str(len(train_ids))]) == 2 and main([*base, "--skip", "-1"]) == 2
    assert main([*base, "--skip", "4", "--limit", "1"]) in (0, 1)
    assert [r["id"] for r in _jsonl(f"{out}.candidates.jsonl")] == train_ids[4:5]
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["studies"] == 1 and summary["skip"] == 4 and summary["limit"] == 1



def test_prefs_build_rescores_another_judges_candidates_without_sampling(tmp_path, pairs, phantoms, sft_checkpoint,
                                                                       cache_dir, monkeypatch):
    """--rescore-from: the same candidates scored by label:f1, no model sampling; a file of other samples is refused."""
    from rrg3d.models.vlm import ReportGenerator

    source = Path(f"{pairs}.candidates.jsonl")
    out = tmp_path / "pairs_f1.jsonl"
    args = ["prefs", "build", str(phantoms), "--model", str(sft_checkpoint), "--out", str(out), "--samples", "3",
            "--max-new-tokens", "24", "--cache-dir", str(cache_dir), "--no-progress", "--judge", "label:f1"]

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("rescoring must not sample")

    monkeypatch.setattr(ReportGenerator, "sample_reports", no_sampling)
    assert main([*args, "--rescore-from", str(source)]) == 0
    before = {r["id"]: r for r in _jsonl(source)}
    after = _jsonl(f"{out}.candidates.jsonl")
    assert {r["id"] for r in after} == set(before)
    for record in after:
        old = before[record["id"]]
        assert record["candidates"] == old["candidates"] and record["sampling"] == old["sampling"]
        assert record["judge"].startswith("label:f1-") and old["judge"].startswith("label:errors-")
        assert record["settings"] != old["settings"] and record["rescored_from"] == str(source.resolve())
        assert all(1.0 <= s <= 5.0 for s in record["scores"])
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["rescored"] == 6 and summary["sampled"] == 0 and summary["rescore_from"] == str(source)
    # other sampling settings share nothing with the source: refused, not mixed in
    assert main([*args, "--out", str(tmp_path / "other.jsonl"), "--temperature", "0.7",
                 "--rescore-from", str(source)]) == 2
    assert main([*args, "--rescore-from", str(f"{out}.candidates.jsonl")]) == 2  # its own file


def _log(run):
    with open(run / "train_log.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_dpo_trains_from_the_sft_checkpoint(tmp_path, pairs, sft_checkpoint, cache_dir):
    run = tmp_path / "dpo"
    args = ["train", "tiny_dpo", f"data.pairs={pairs}", f"model.init={sft_checkpoint}", f"run_dir={run}",
            f"data.cache_dir={cache_dir}", "optim.warmup_ratio=0", *QUICK]
    assert main(args) == 0
    rows = _log(run)
    assert rows and {"reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "kl"} <= set(rows[0])
    # the first step's policy is the reference itself: ln 2, no margin, no KL
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-4)
    assert abs(float(rows[0]["reward_margin"])) < 1e-4 and abs(float(rows[0]["kl"])) < 1e-3
    saved = json.loads((run / "reference_logps.json").read_text())
    # the reference is the SFT checkpoint as saved (its adapter on), computed with dropout off
    from rrg3d.models.checkpoint import load_checkpoint, read_manifest
    from rrg3d.train.dpo import collate_pairs, pair_logprobs
    from rrg3d.train.prefs import read_pairs

    records = read_pairs(pairs)
    sft = load_checkpoint(sft_checkpoint)
    trained = load_checkpoint(run / "final")
    assert read_manifest(run / "final")["lm"]["weights"] == "adapter"

    def logprobs(model):
        from rrg3d.train.data import build_dataset

        studies = build_dataset(records[0]["manifest"], model.config.preprocess, cache_dir=cache_dir,
                                require_report=False, progress=False)
        items = [{"id": pair["id"], "index": index, "chosen": pair["chosen"], "rejected": pair["rejected"],
                  "volume": torch.from_numpy(studies.load_volume(studies.ids.index(pair["id"]))),
                  "reference": torch.zeros(4)} for index, pair in enumerate(records)]
        with torch.no_grad():
            chosen, rejected, _, _ = pair_logprobs(model, model, collate_pairs(items), 192)
        return chosen.double(), rejected.double()

    reference = torch.tensor(saved["values"], dtype=torch.float64)
    chosen, rejected = logprobs(sft)
    assert torch.allclose(reference[:, 0], chosen, atol=2e-3) and torch.allclose(reference[:, 1], rejected, atol=2e-3)
    # after training: the chosen reports gained probability relative to the rejected ones
    after_chosen, after_rejected = logprobs(trained)
    margin = ((after_chosen - reference[:, 0]) - (after_rejected - reference[:, 1])).mean()
    assert float(margin) > 0
    # the reference file is what the run started with: resumed runs read it back rather than recompute
    assert json.loads((run / "reference_logps.json").read_text())["values"] == saved["values"]


def test_dpo_raises_the_margin_on_fixed_pairs_and_resumes_bit_for_bit(tmp_path, pairs, sft_checkpoint, cache_dir):
    common = [f"data.pairs={pairs}", f"model.init={sft_checkpoint}", f"data.cache_dir={cache_dir}",
              "data.batch_size=1", "phases.0.epochs=null", "phases.0.steps=6", "optim.lr=3e-3",
              "optim.warmup_ratio=0", "train.save_every=0", *QUICK]
    straight = train("tiny_dpo", [*common, f"run_dir={tmp_path / 'straight'}"])
    margins = [float(r["reward_margin"]) for r in _log(tmp_path / "straight")]
    assert margins[0] == pytest.approx(0, abs=1e-4) and max(margins[3:]) > 0.05
    with pytest.raises(TrainingInterrupted):
        train("tiny_dpo", [*common, f"run_dir={tmp_path / 'split'}", "train.stop_after=3"])
    before = (tmp_path / "split" / "reference_logps.json").read_text()
    resumed = train("tiny_dpo", [*common, f"run_dir={tmp_path / 'split'}"], resume=True)
    assert (tmp_path / "split" / "reference_logps.json").read_text() == before
    assert resumed.losses == straight.losses[3:]
    a, b = trainable_state(straight.model), trainable_state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DDP_WORKER = """
import sys
from safetensors.torch import save_file
from rrg3d.train import train
from rrg3d.train.loop import trainable_state

result = train("tiny_dpo", sys.argv[2:])
save_file(trainable_state(result.model), sys.argv[1])
"""


@pytest.mark.slow  # two 2-process runs (~35 s); DDP itself is covered by tests/train/test_distributed.py
def test_two_ddp_processes_share_the_reference_and_agree(tmp_path, pairs, sft_checkpoint, cache_dir, run_ddp):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    run = tmp_path / "run"
    run_ddp(script, [str(tmp_path / "rank{rank}.safetensors"), f"data.pairs={pairs}", f"model.init={sft_checkpoint}",
                     f"data.cache_dir={cache_dir}", "data.batch_size=1", "phases.0.epochs=null", "phases.0.steps=2",
                     "optim.warmup_ratio=0", f"run_dir={run}", *QUICK])
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    rows = _log(run)
    assert len(rows) == 2 and float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-4)
    assert len(json.loads((run / "reference_logps.json").read_text())["values"]) == len(_jsonl(pairs))


def test_dpo_refusals(tmp_path, pairs, sft_checkpoint, phantoms):
    with pytest.raises(ConfigError, match=r"model\.init"):
        train("tiny_dpo", [f"data.pairs={pairs}", *QUICK, f"run_dir={tmp_path / 'a'}"])
    with pytest.raises(ConfigError, match=r"data\.pairs"):
        train("tiny_dpo", [f"model.init={sft_checkpoint}", *QUICK, f"run_dir={tmp_path / 'b'}"])
    with pytest.raises(ConfigError, match="vision tower frozen"):
        train("tiny_dpo", [f"data.pairs={pairs}", f"model.init={sft_checkpoint}", "model.train.projector=true",
                           *QUICK, f"run_dir={tmp_path / 'c'}"])
    # a pair whose study the manifest puts in the test split is refused even if the pair says "train"
    records = _jsonl(pairs)
    test_id = next(r["id"] for r in _jsonl(phantoms) if r["split"] == "test")
    forged = tmp_path / "forged.jsonl"
    forged.write_text(json.dumps({**records[0], "id": test_id}) + "\n")
    with pytest.raises(ConfigError, match="training split only"):
        train("tiny_dpo", [f"data.pairs={forged}", f"model.init={sft_checkpoint}", *QUICK,
                           f"run_dir={tmp_path / 'd'}"])
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({**records[0], "id": "no_such_study"}) + "\n")
    with pytest.raises(RRG3DError, match="no_such_study"):
        train("tiny_dpo", [f"data.pairs={missing}", f"model.init={sft_checkpoint}", *QUICK,
                           f"run_dir={tmp_path / 'e'}"])

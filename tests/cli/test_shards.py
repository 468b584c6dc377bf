"""Sharded batch work: `--shard I/N` (or RANK/WORLD_SIZE) for preprocess and generate, `rrg3d merge`, and the one
exit-code rule of the batch commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rrg3d.cli import main
from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.utils.exits import batch_exit_code
from rrg3d.utils.shards import (
    Shard,
    exclusive_lock,
    find_shards,
    parse_shard,
    resolve_shard,
    select,
    shard_from_env,
    shard_of,
    shard_path,
)

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _rrg3d(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rrg3d.cli", *args], env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(*processes: subprocess.Popen) -> list[tuple[int, str]]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        results.append((process.returncode, out + err))
    return results


# ---------------------------------------------------------------------------------------------- shards and exit codes


def test_parse_shard_and_its_errors():
    assert parse_shard("1/4") == Shard(index=1, count=4) and parse_shard(" 0 / 1 ") == Shard(0, 1)
    assert str(Shard(1, 4)) == "1/4" and Shard(1, 4).label == "shard-1-of-4"
    for text, expected in (("4/4", "must be below N"), ("1/0", "at least 1"), ("1-4", "takes I/N"),
                           ("-1/4", "takes I/N"), ("a/b", "takes I/N"), ("", "takes I/N")):
        with pytest.raises(ConfigError, match=expected):
            parse_shard(text)
    with pytest.raises(ConfigError, match="below 2"):
        Shard(2, 2)


def test_shard_from_the_launchers_environment():
    assert shard_from_env({}) is None
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == Shard(3, 4)
    assert shard_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == Shard(1, 2)
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None, "one process: no sharding"
    assert shard_from_env({"RANK": "1"}) is None, "an incomplete pair is not a shard"
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(ConfigError, match="RANK="):
            shard_from_env(bad)
    launched = {"RANK": "1", "WORLD_SIZE": "2"}
    assert resolve_shard(None, launched) == Shard(1, 2)
    assert resolve_shard("0/3", launched) == Shard(0, 3), "--shard wins over the environment"
    assert resolve_shard("0/1", launched) is None, "0/1 is everything, under the unsharded names"


def test_assignment_is_a_stable_partition_independent_of_order_and_of_other_items():
    ids = [f"study_{i}" for i in range(400)]
    shards = [select(ids, Shard(i, 4)) for i in range(4)]
    assert sorted(i for s in shards for i in s) == sorted(ids)
    assert all(s == [i for i in ids if i in set(s)] for s in shards), "input order kept within a shard"
    assert all(70 <= len(s) <= 130 for s in shards), [len(s) for s in shards]
    shuffled = list(reversed(ids))
    grown = ids + [f"new_{i}" for i in range(50)]
    for index in range(4):
        shard = Shard(index, 4)
        assert set(select(shuffled, shard)) == set(shards[index])
        assert set(select(grown, shard)) & set(ids) == set(shards[index]), "a growing manifest moves no study"
    assert shard_of("study_0", 4) == shard_of("study_0", 4) and select(ids, None) == ids
    records = [{"id": i} for i in ids]
    assert [r["id"] for r in select(records, Shard(2, 4), key=lambda r: r["id"])] == shards[2]


def test_shard_files_and_the_lock(tmp_path):
    out = tmp_path / "pred.jsonl"
    assert shard_path(out, Shard(1, 4)) == tmp_path / "pred.shard-1-of-4.jsonl"
    assert shard_path(tmp_path / "summary.json", Shard(0, 2)).name == "summary.shard-0-of-2.json"
    assert shard_path(out, None) == out
    with pytest.raises(RRG3DError, match="no shard files"):
        find_shards(out)
    for index in (0, 2):
        shard_path(out, Shard(index, 3)).write_text("")
    with pytest.raises(RRG3DError, match=r"1 of 3 shards missing: pred\.shard-1-of-3\.jsonl"):
        find_shards(out)
    shard_path(out, Shard(1, 3)).write_text("")
    assert find_shards(out) == (3, {i: shard_path(out, Shard(i, 3)) for i in range(3)})
    shard_path(out, Shard(0, 1)).write_text("")
    with pytest.raises(RRG3DError, match="choose with --shards"):
        find_shards(out)
    assert find_shards(out, 3)[0] == 3
    lock = tmp_path / "x.lock"
    with exclusive_lock(lock) as first:
        with exclusive_lock(lock) as second:
            assert first and not second
        assert lock.exists()
    assert not lock.exists()


@pytest.mark.parametrize(("done", "failed", "strict", "code"), [
    (3, 0, False, 0), (3, 0, True, 0), (3, 1, False, 0), (3, 1, True, 1), (0, 2, False, 2), (0, 2, True, 2),
    (0, 0, False, 0), (0, 0, True, 0)])
def test_batch_exit_code(done, failed, strict, code):
    assert batch_exit_code(done, failed, strict) == code


# ------------------------------------------------------------------------------------------- sharded batch commands


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Six phantom studies at 32×64×64 plus one study whose scan is missing (recorded as a failure)."""
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    out = tmp_path_factory.mktemp("shard_phantoms")
    manifest = generate_phantoms(PhantomConfig(n=6, seed=0, shape=(32, 64, 64)), out, workers=1, progress=False)
    with_broken = out / "studies.jsonl"
    broken = json.dumps({"id": "broken", "images": {"ct": "vols/missing.nii.gz"}})
    lines = manifest.read_text().splitlines()
    with_broken.write_text("\n".join([*lines[:3], broken, *lines[3:]]) + "\n")
    return with_broken


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained CT-only model on the tiny preset that writes 4 tokens (greedy: deterministic)."""
    pytest.importorskip("transformers")
    from rrg3d.models.checkpoint import save_checkpoint
    from rrg3d.models.config import load_model_config
    from rrg3d.models.vlm import ReportGenerator

    spec = load_model_config("tiny_resnet3d").to_dict()
    spec["generation"] = {**(spec.get("generation") or {}), "max_new_tokens": 4, "temperature": 0.0,
                          "num_beams": 1}
    model = ReportGenerator.from_config(spec, seed=0).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("shard_ckpt") / "tiny")


def test_sharded_preprocess_merges_into_the_unsharded_cache(phantoms, tmp_path, capsys):
    full = tmp_path / "full"
    assert main(["preprocess", str(phantoms), "--preset", "tiny", "--out", str(full), "--no-progress"]) == 0
    assert main(["preprocess", str(phantoms), "--preset", "tiny", "--out", str(full), "--no-progress",
                 "--strict"]) == 1, "--strict: the recorded failure gives 1"
    cache = tmp_path / "sharded"
    common = ["preprocess", str(phantoms), "--preset", "tiny", "--out", str(cache), "--no-progress"]
    results = _finish(_rrg3d(*common, "--shard", "0/2"), _rrg3d(*common, "--shard", "1/2"))
    assert [code for code, _ in results] == [0, 0], results
    for index in range(2):
        summary = json.loads((cache / f"summary.shard-{index}-of-2.json").read_text())
        assert summary["complete"] and summary["shard"] == f"{index}/2"
    assert sum(len(_jsonl(cache / f"manifest.shard-{i}-of-2.jsonl")) for i in range(2)) == 6
    assert (cache / "manifest.jsonl").is_file(), "the last shard to finish merged"
    assert not (cache / "merge.lock").exists()
    (cache / "manifest.jsonl").unlink()
    assert main(["merge", "cache", str(cache)]) == 0
    assert "6/7 studies ready" in capsys.readouterr().out

    merged, reference = _jsonl(cache / "manifest.jsonl"), _jsonl(full / "manifest.jsonl")
    assert merged == reference, "same records, same order"
    for record in reference:
        for relative in [*record["images"].values(), record["masks"]["path"]]:
            if relative:
                assert np.array_equal(np.load(cache / relative), np.load(full / relative)), relative
    assert [e["id"] for e in _jsonl(cache / "errors.jsonl")] == ["broken"]
    summary, unsharded = (json.loads((d / "summary.json").read_text()) for d in (cache, full))
    for key in ("total", "failed", "invalid_lines", "preset_sha256"):
        assert summary[key] == unsharded[key], key
    assert summary["processed"] == 6 and summary["shards"] == 2

    # resume per shard: everything is done; a shard that is not finished blocks the merge
    assert main([*common, "--shard", "0/2", "--no-merge"]) == 0
    assert "already done" in capsys.readouterr().out
    summary_file = cache / "summary.shard-1-of-2.json"
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "complete": False}))
    assert main(["merge", "cache", str(cache)]) == 2
    assert "not finished: summary.shard-1-of-2.json" in capsys.readouterr().err
    assert main(["merge", "cache", str(cache), "--allow-incomplete"]) == 0
    assert _jsonl(cache / "manifest.jsonl") == reference


def test_sharded_generate_gives_the_unsharded_records(phantoms, checkpoint, tmp_path, capsys, monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    common = ["generate", str(phantoms), "--model", str(checkpoint), "--device", "cpu", "--quiet", "--no-progress"]
    full = tmp_path / "full.jsonl"
    assert main([*common, "--out", str(full)]) == 0, "one scan failed: the batch ran, exit 0"
    reference = _jsonl(full)
    assert [r["id"] for r in reference] == [r["id"] for r in _jsonl(phantoms)]
    assert sum(1 for r in reference if r.get("error")) == 1

    out = tmp_path / "pred.jsonl"
    results = _finish(_rrg3d(*common, "--out", str(out), "--shard", "0/2"),
                      _rrg3d(*common, "--out", str(out), "--shard", "1/2", "--strict"))
    codes = [code for code, _ in results]
    broken_shard = Shard(0, 2).owns("broken")
    assert codes == ([0, 0] if broken_shard else [0, 1]), results
    shards = [_jsonl(tmp_path / f"pred.shard-{i}-of-2.jsonl") for i in range(2)]
    assert not {r["id"] for r in shards[0]} & {r["id"] for r in shards[1]}
    assert all((tmp_path / f"pred.shard-{i}-of-2.done.json").is_file() for i in range(2))

    def same(records: list[dict]) -> list[tuple]:
        return [(r["id"], r["report"], r.get("error"), {k: v for k, v in r["meta"].items() if k != "seconds"})
                for r in records]

    assert out.is_file(), "the last shard to finish merged"
    assert same(_jsonl(out)) == same(reference), "same ids, same reports, same order"
    out.unlink()
    assert main(["merge", "predictions", str(out)]) == 0
    assert same(_jsonl(out)) == same(reference)
    assert main(["merge", "predictions", str(out), "--manifest", str(phantoms)]) == 0
    assert same(_jsonl(out)) == same(reference)

    # the shard from the launcher's environment (RANK=1 WORLD_SIZE=2, no --shard) resumes shard 1/2: nothing to
    # redo, and as every shard is complete it merges again
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out.unlink()
    assert main([*common, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"shard 1/2: 0 reports, 0 failed, {len(shards[1])} already done" in err, err
    assert "all 2 shards done: merged" in err and same(_jsonl(out)) == same(reference)
    assert _jsonl(tmp_path / "pred.shard-1-of-2.jsonl") == shards[1]


def test_merge_refuses_overlapping_and_unfinished_shards(tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    records = {0: [{"id": "a", "report": "x"}, {"id": "b", "report": "y"}], 1: [{"id": "b", "report": "z"}]}
    for index, rows in records.items():
        path = shard_path(out, Shard(index, 2))
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        path.with_name(f"pred.shard-{index}-of-2.done.json").write_text(json.dumps(
            {"inputs": ["m.jsonl"], "studies": 3, "positions": [[p, r["id"]] for p, r in enumerate(rows)]}))
    assert main(["merge", "predictions", str(out)]) == 2
    assert "1 ids are in more than one shard" in capsys.readouterr().err
    marker = tmp_path / "pred.shard-0-of-2.done.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "studies": 5}))
    assert main(["merge", "predictions", str(out)]) == 2
    assert "study counts differ" in capsys.readouterr().err
    shard_path(out, Shard(1, 2)).write_text(json.dumps({"id": "c", "report": None, "error": "unreadable"}) + "\n"
                                            + json.dumps({"id": "c", "report": "w"}) + "\n" + '{"id": "d", "rep')
    (tmp_path / "pred.shard-1-of-2.done.json").unlink()
    assert main(["merge", "predictions", str(out)]) == 2
    assert "not finished: pred.shard-1-of-2.jsonl" in capsys.readouterr().err
    assert main(["merge", "predictions", str(out), "--allow-incomplete"]) == 0
    assert [(r["id"], r["report"]) for r in _jsonl(out)] == [("a", "x"), ("b", "y"), ("c", "w")], \
        "sorted by id without every marker; the retried study once, its good record; the torn line dropped"


@pytest.mark.parametrize(("counts", "strict", "code"), [
    ({"ok": 2, "empty_predictions": 1, "missing_predictions": 0, "errors": 0}, True, 0),  # empty: a result
    ({"ok": 2, "empty_predictions": 0, "missing_predictions": 1, "errors": 0}, False, 0),
    ({"ok": 2, "empty_predictions": 0, "missing_predictions": 0, "errors": 1}, True, 1),
    ({"ok": 0, "empty_predictions": 0, "missing_predictions": 1, "errors": 2}, False, 2)])
def test_evaluate_follows_the_exit_rule(tmp_path, monkeypatch, counts, strict, code):
    import rrg3d.evaluate.runner as runner

    full = {**counts, "references": 3, "scored": 3, "extra_predictions": 0}
    monkeypatch.setattr(runner, "evaluate_files", lambda *args, **kwargs: {"counts": full})
    args = ["evaluate", "p.jsonl", "--refs", "r.jsonl", "--out", str(tmp_path), "--no-progress"]
    assert main([*args, *(["--strict"] if strict else [])]) == code


@pytest.mark.parametrize(("sampled", "resumed", "failed", "strict", "code"), [
    (2, 1, 0, True, 0), (2, 0, 1, False, 0), (0, 2, 1, True, 1), (0, 0, 3, False, 2)])
def test_prefs_follows_the_exit_rule(tmp_path, monkeypatch, sampled, resumed, failed, strict, code):
    pytest.importorskip("transformers")
    import rrg3d.train.prefs as prefs

    def fake(*args, **kwargs):
        return prefs.PrefsSummary(studies=sampled + resumed + failed, sampled=sampled, resumed=resumed, failed=failed)

    monkeypatch.setattr(prefs, "build_preferences", fake)
    args = ["prefs", "build", "m.jsonl", "--model", "sft", "--out", str(tmp_path / "pairs.jsonl"), "--no-progress"]
    assert main([*args, *(["--strict"] if strict else [])]) == code

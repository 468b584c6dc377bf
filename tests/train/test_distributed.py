"""Real processes: SIGTERM saves a checkpoint and the run resumes from it; two DDP processes on CPU (gloo) end
with identical weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("transformers")

QUICK = ["data.batch_size=1", "data.max_length=160", "data.max_val_samples=1"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, base_overrides):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "rrg3d.cli", "train", "tiny_sft", *base_overrides, *QUICK,
               "phases.0.steps=40", "train.save_every=0", f"run_dir={run}"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        log = run / "train_log.csv"
        while time.time() < deadline and process.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 2:  # header + the first step
                break
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1][-2000:]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "train_state" / "trainer.json").is_file()
    step = int(checkpoints[0].name.split("_")[1])
    assert 1 <= step < 40
    resumed = subprocess.run([*command[:-1], f"train.stop_after={step + 1}", f"run_dir={run}", "--resume"],
                             env=_env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 3, resumed.stderr[-2000:]
    assert (run / "checkpoints" / f"step_{step + 1:06d}").is_dir()
    rows = (run / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, step + 2))


WORKER = textwrap.dedent('''
    import sys, torch
    from safetensors.torch import save_file
    from rrg3d.train import train
    from rrg3d.train.loop import trainable_state

    result = train("tiny_align", sys.argv[2:])
    save_file(trainable_state(result.model), sys.argv[1])
''')


def test_two_ddp_processes_on_cpu_agree(tmp_path, base_overrides, run_ddp):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    overrides = [*base_overrides, *QUICK, "phases.0.steps=2", "train.save_every=1", f"run_dir={tmp_path / 'run'}"]
    run_ddp(script, [str(tmp_path / "rank{rank}.safetensors"), *overrides], timeout=240)
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key in weights[0]:
        assert (weights[0][key] == weights[1][key]).all(), key
    state = tmp_path / "run" / "checkpoints" / "step_000002" / "train_state"
    assert (state / "rng_rank0.pt").is_file() and (state / "rng_rank1.pt").is_file()
    trainer = (state / "trainer.json").read_text()
    assert '"world_size": 2' in trainer

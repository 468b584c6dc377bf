"""Training fixtures: a session-wide set of 8 tiny phantoms (32x64x64) and one preprocessing cache for all runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """Manifest of 8 phantom studies (6 train, 1 val, 1 test) at the tiny preset's size."""
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    return generate_phantoms(PhantomConfig(n=8, seed=0, shape=(32, 64, 64)), out, workers=1, progress=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def base_overrides(phantoms, cache_dir) -> list[str]:
    """What every tiny training run in these tests shares: the data, one thread, no progress bar."""
    return [f"data.manifest={phantoms}", f"data.cache_dir={cache_dir}", "train.threads=1", "train.progress=false",
            "train.tensorboard=false"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def run_ddp() -> Callable[[Path, Sequence[str]], None]:
    """``run_ddp(script, args)``: run a Python script as two DDP processes on CPU (gloo), ``{rank}`` in an argument
    replaced by the process's rank; fails with the stderr of a process that did not exit 0."""

    def launch(script: Path, args: Sequence[str], timeout: float = 300) -> None:
        port = str(_free_port())
        processes = []
        for rank in (0, 1):
            env = dict(os.environ)
            env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
                        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true"})
            argv = [a.replace("{rank}", str(rank)) for a in args]
            processes.append(subprocess.Popen([sys.executable, str(script), *argv], env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=timeout) for p in processes]
        for process, (_, err) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, err[-3000:]

    return launch

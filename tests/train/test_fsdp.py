"""FSDP2 in the training loop: what is sharded and how accelerate is set up (in process), and real runs of two CPU
processes over gloo — the same losses and weights as DDP, and a run stopped after step 2 and resumed equal to an
uninterrupted one, bit for bit. A ``gpu`` test runs the same on two CUDA GPUs (NCCL, bf16) where there are some."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from rrg3d.errors import ConfigError

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "src" / "rrg3d" / "configs" / "accelerate"
QUICK = ["data.batch_size=1", "data.max_length=160", "data.max_val_samples=1", "optim.warmup_steps=0",
         "train.save_every=0"]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}

WORKER = textwrap.dedent('''
    import json, sys
    import torch.distributed as dist
    from safetensors.torch import save_file
    from rrg3d.train import train
    from rrg3d.train.loop import TrainingInterrupted, trainable_state

    out, recipe, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
    try:
        result = train(recipe, sys.argv[4:], resume=resume)
    except TrainingInterrupted as stopped:
        result = stopped.result
    rank = dist.get_rank()
    info = {"losses": result.losses, "step": result.step, "kind": type(result.model).__name__}
    if rank == 0 and result.model is not None:  # the main process's model is whole (DDP) or the replica (FSDP2)
        save_file(trainable_state(result.model), f"{out}.safetensors")
    if rank == 1 and result.model is not None:  # the other process keeps its shards
        from torch.distributed.fsdp import FSDPModule
        model = result.model
        info["trainable"] = sorted({(type(p).__name__, str(p.dtype)) for p in model.parameters() if p.requires_grad})
        info["policies"] = sorted({str(m._get_fsdp_state()._mp_policy) for m in model.modules()
                                   if isinstance(m, FSDPModule)})
    with open(f"{out}.rank{rank}.json", "w") as handle:
        json.dump(info, handle)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(script: Path, args: Sequence[str], env: dict[str, str], *, cpu: bool = True, timeout: float = 300) -> None:
    """Two processes of ``script`` with the environment ``accelerate launch`` gives them (rank, world size, master
    address) plus ``env``; CPU processes talk over gloo."""
    port = str(_free_port())
    processes = []
    for rank in (0, 1):
        full = dict(os.environ)
        full.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
                     "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", **env})
        if cpu:
            full["ACCELERATE_USE_CPU"] = "true"
        processes.append(subprocess.Popen([sys.executable, str(script), *args], env=full, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-4000:]


def _run(tmp_path: Path, name: str, recipe: str, overrides: Sequence[str], env: dict[str, str], *,
         resume: bool = False, cpu: bool = True) -> dict:
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    out = tmp_path / name
    launch(script, [str(out), recipe, "resume" if resume else "fresh", *overrides], env, cpu=cpu)
    info = json.loads((tmp_path / f"{name}.rank0.json").read_text())
    other = tmp_path / f"{name}.rank1.json"
    info["rank1"] = json.loads(other.read_text())
    return info


def _weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tmp_path / f"{name}.safetensors"))


# -- in process --------------------------------------------------------------------------------------------------------
def test_fsdp1_is_refused_with_a_pointer_to_fsdp2_and_fsdp2_passes():
    from accelerate.utils import DistributedType

    from rrg3d.train.loop import check_distributed_type
    from rrg3d.train.sharding import requested_fsdp_version

    with pytest.raises(ConfigError, match=r"version 1 \(FSDP1.*fsdp2\.yaml"):
        check_distributed_type(DistributedType.FSDP, 1)
    with pytest.raises(ConfigError, match=r"fsdp2\.yaml"):
        check_distributed_type(DistributedType.FSDP)  # accelerate's default FSDP_VERSION is 1
    check_distributed_type(DistributedType.FSDP, 2)
    assert requested_fsdp_version({}) is None
    assert requested_fsdp_version({"ACCELERATE_USE_FSDP": "true"}) == 1
    assert requested_fsdp_version({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == 2


def _launch_env(config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file CONFIG`` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_shipped_fsdp2_config_builds_the_plugin_the_loop_needs(monkeypatch):
    """fsdp2.yaml through accelerate's launcher → FSDP_VERSION=2; the plugin built from that environment computes in
    bf16, reduces in float32 and leaves the units to rrg3d; fsdp.yaml is the same config."""
    import yaml

    from rrg3d.train.sharding import make_fsdp2_plugin

    env = _launch_env(ACCELERATE_CONFIGS / "fsdp2.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = make_fsdp2_plugin("bf16")
    assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy is None and not plugin.cpu_ram_efficient_loading
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert make_fsdp2_plugin("no").mixed_precision_policy is None
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        make_fsdp2_plugin("bf16")
    load = lambda name: yaml.safe_load((ACCELERATE_CONFIGS / name).read_text())  # noqa: E731
    assert load("fsdp.yaml") == load("fsdp2.yaml")


def test_units_are_the_decoder_layers_and_the_vision_parts():
    from rrg3d.models.language import base_model
    from rrg3d.models.vlm import ReportGenerator
    from rrg3d.train.sharding import fsdp2_units

    model = ReportGenerator.from_config("tiny_ctvit_v")
    units = fsdp2_units(model)
    layers = [u for u in units if type(u).__name__.endswith("DecoderLayer")]
    assert len(layers) == base_model(model.lm).config.num_hidden_layers
    assert model.vision.encoder in units and model.vision.projector in units
    assert model.vision.compressor not in units  # average pooling: no parameters
    assert not any(u is model.lm or u is model.vision for u in units)
    assert len(units) == len(layers) + 2


# -- two CPU processes -------------------------------------------------------------------------------------------------
def test_fsdp2_on_two_cpu_processes_matches_ddp(tmp_path, base_overrides):
    """tiny_sft (LoRA inside the sharded decoder layers + the projector), 2 micro-batches per step (FSDP2's gradient
    sync skipped on the first), 3 steps over an epoch boundary: the losses and trained weights of FSDP2 equal DDP's
    within float32 reduction noise, and the portable checkpoint holds the trained weights."""
    common = [*base_overrides, *QUICK, "phases.0.steps=3", "train.gradient_accumulation_steps=2"]
    ddp = _run(tmp_path, "ddp", "tiny_sft", [*common, f"run_dir={tmp_path / 'run_ddp'}"], {})
    fsdp = _run(tmp_path, "fsdp", "tiny_sft", [*common, f"run_dir={tmp_path / 'run_fsdp'}"], FSDP_ENV)
    assert fsdp["rank1"]["kind"] == "FSDPReportGenerator" and ddp["kind"] == "ReportGenerator"
    assert fsdp["rank1"]["trainable"] == [["DTensor", "torch.float32"]]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5) and len(fsdp["losses"]) == 3
    reference, sharded = _weights(tmp_path, "ddp"), _weights(tmp_path, "fsdp")
    assert reference.keys() == sharded.keys() and any("lora" in k for k in sharded)
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], rtol=1e-4, atol=1e-6)

    # the portable checkpoint (process 0 wrote the gathered weights) loads alone and holds the trained weights
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.train.loop import trainable_state

    loaded = trainable_state(load_checkpoint(tmp_path / "run_fsdp" / "final", trainable=True))
    for key in sharded:
        assert torch.equal(loaded[key], sharded[key]), key
    assert (tmp_path / "run_fsdp" / "eval_log.csv").read_text().count("\n") == 2  # header + the last step


@pytest.mark.slow
def test_fsdp2_resumes_bit_for_bit_from_its_sharded_state(tmp_path, base_overrides):
    """2 FSDP2 steps + resume from the sharded train state (one .distcp file per process) equal 3 straight steps
    exactly (slow: three 2-process runs)."""
    common = [*base_overrides, *QUICK, "phases.0.steps=3", "train.gradient_accumulation_steps=2"]
    fsdp = _run(tmp_path, "fsdp", "tiny_sft", [*common, f"run_dir={tmp_path / 'run_fsdp'}"], FSDP_ENV)
    sharded = _weights(tmp_path, "fsdp")
    resumed_run = tmp_path / "run_resume"
    first = _run(tmp_path, "first", "tiny_sft", [*common, "train.stop_after=2", f"run_dir={resumed_run}"], FSDP_ENV)
    assert first["step"] == 2 and first["losses"] == fsdp["losses"][:2]
    state = resumed_run / "checkpoints" / "step_000002" / "train_state"
    assert sorted(p.name for p in (state / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((state / "trainer.json").read_text())["distribution"] == "fsdp2"
    second = _run(tmp_path, "second", "tiny_sft", [*common, f"run_dir={resumed_run}"], FSDP_ENV, resume=True)
    assert second["losses"] == fsdp["losses"][2:]
    resumed = _weights(tmp_path, "second")
    for key in sharded:
        assert torch.equal(resumed[key], sharded[key]), key


@pytest.mark.slow
def test_fsdp2_bf16_keeps_float32_master_shards(tmp_path, base_overrides):
    """Mixed precision under FSDP2: every unit computes in bf16 and reduces in float32 while the trainable shards stay
    float32 (tiny_ctvit: a perceiver compressor, since CPU average pooling has no bf16 kernel)."""
    overrides = [*base_overrides, *QUICK, "model.config=tiny_ctvit", "phases.0.steps=1", "train.mixed_precision=bf16",
                 "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}",
                 f"run_dir={tmp_path / 'run'}"]
    info = _run(tmp_path, "bf16", "tiny_sft", overrides, FSDP_ENV)
    assert info["rank1"]["trainable"] == [["DTensor", "torch.float32"]]
    assert info["rank1"]["policies"] == ["MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, "
                                         "output_dtype=None, cast_forward_inputs=True)"]
    assert all(torch.isfinite(torch.tensor(info["losses"])))


@pytest.mark.gpu
def test_fsdp2_on_two_gpus_resumes_bit_for_bit(tmp_path, base_overrides):
    """The same on two CUDA GPUs over NCCL in bf16: 3 straight steps equal 2 + resume."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    common = [*base_overrides, *QUICK, "phases.0.steps=3", "train.mixed_precision=bf16",
              "train.gradient_accumulation_steps=2"]
    straight = _run(tmp_path, "gpu", "tiny_sft", [*common, f"run_dir={tmp_path / 'a'}"], FSDP_ENV, cpu=False)
    _run(tmp_path, "gpu1", "tiny_sft", [*common, "train.stop_after=2", f"run_dir={tmp_path / 'b'}"], FSDP_ENV,
         cpu=False)
    second = _run(tmp_path, "gpu2", "tiny_sft", [*common, f"run_dir={tmp_path / 'b'}"], FSDP_ENV, cpu=False,
                  resume=True)
    assert second["losses"] == straight["losses"][2:]
    a, b = _weights(tmp_path, "gpu"), _weights(tmp_path, "gpu2")
    assert all(torch.equal(a[k], b[k]) for k in a)

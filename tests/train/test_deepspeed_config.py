"""DeepSpeed ZeRO in the training loop: the config resolved from recipe + accelerate config (micro-batch size,
gradient accumulation, clipping; "auto" filled, conflicts refused), the shipped accelerate configs as accelerate's
launcher exports them, the per-rank optimizer state handed to ZeRO as it expects; and, where deepspeed is installed,
real ZeRO-2 / ZeRO-3 runs of two CPU processes over gloo (``slow``) and of two GPUs (``gpu``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

# the two-process launcher and worker of the FSDP tests (tests/train is on sys.path: basenames are unique)
from test_fsdp import QUICK, _run, _weights

from rrg3d.errors import ConfigError
from rrg3d.train.sharding import (
    check_accelerate_env,
    load_zero_optimizer_state,
    make_deepspeed_plugin,
    resolve_deepspeed_config,
    resolve_zero3_sizes,
)

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "src" / "rrg3d" / "configs" / "accelerate"


# -- config resolution -------------------------------------------------------------------------------------------------
def test_the_recipe_fills_batch_geometry_and_clipping():
    accelerate_default = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                          "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3}}
    resolved = resolve_deepspeed_config(accelerate_default, micro_batch=2, accumulation=4, world=8, max_grad_norm=1.0)
    assert resolved["train_micro_batch_size_per_gpu"] == 2 and resolved["gradient_accumulation_steps"] == 4
    assert resolved["train_batch_size"] == 2 * 4 * 8 and resolved["gradient_clipping"] == 1.0
    assert resolved["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert resolved["zero_allow_untested_optimizer"] is True
    assert accelerate_default["train_batch_size"] == "auto"  # the input is left alone
    # nothing given at all (accelerate's plugin without a JSON); no clipping in the recipe → 0 (off)
    resolved = resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch=1, accumulation=1, world=2,
                                        max_grad_norm=None)
    assert resolved["gradient_clipping"] == 0.0 and resolved["train_batch_size"] == 2
    assert "stage3_gather_16bit_weights_on_model_save" not in resolved["zero_optimization"]
    # an explicit value equal to the recipe's is fine
    same = resolve_deepspeed_config({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}},
                                    micro_batch=2, accumulation=4, world=1, max_grad_norm=1.0)
    assert same["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("gradient_accumulation_steps", 1, "train.gradient_accumulation_steps"),
    ("train_micro_batch_size_per_gpu", 8, "batch size"),
    ("train_batch_size", 3, "processes"),
    ("gradient_clipping", 0.5, "optim.max_grad_norm"),
])
def test_a_config_that_disagrees_with_the_recipe_is_refused(key, value, needle):
    config = {key: value, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=needle):
        resolve_deepspeed_config(config, micro_batch=2, accumulation=4, world=2, max_grad_norm=1.0)


def test_optimizer_and_scheduler_sections_are_refused():
    for section in ("optimizer", "scheduler"):
        with pytest.raises(ConfigError, match=section):
            resolve_deepspeed_config({section: {"type": "AdamW"}, "zero_optimization": {"stage": 2}}, micro_batch=1,
                                     accumulation=1, world=1, max_grad_norm=None)


def test_zero3_sizes_left_auto_come_from_the_lm_hidden_size():
    config = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": 7}}
    zero = resolve_zero3_sizes(config, 576)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 576 * 576 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 576 * 576)
    assert zero["stage3_param_persistence_threshold"] == 7  # explicit values stay
    zero = resolve_zero3_sizes({"zero_optimization": {"reduce_bucket_size": "auto"}}, None)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 500_000_000  # no Hugging Face part: DeepSpeed's default


def _deepspeed_launch_env(config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file CONFIG`` (a DeepSpeed config) gives the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2.yaml", "2"), ("deepspeed_zero3.yaml", "3")])
def test_shipped_configs_leave_accumulation_and_clipping_to_the_recipe(name, stage, monkeypatch):
    env = _deepspeed_launch_env(ACCELERATE_CONFIGS / name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env
    check_accelerate_env(8, 0.3, env)  # any recipe goes
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = make_deepspeed_plugin(micro_batch=2, accumulation=8, world=4, max_grad_norm=0.3)
    config = plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (2, 8, 64, 0.3)
    assert config["zero_optimization"]["stage"] == int(stage) and plugin.zero_stage == int(stage)
    assert plugin.gradient_accumulation_steps == 8 and plugin.zero3_init_flag is False
    if stage == "3":
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_an_accelerate_config_counting_accumulation_differently_is_refused(tmp_path, monkeypatch):
    """The old deepspeed_zero2.yaml said gradient_accumulation_steps: 1 — accelerate then stepped every micro-batch
    while the loop counted the recipe's steps."""
    old = tmp_path / "old.yaml"
    old.write_text((ACCELERATE_CONFIGS / "deepspeed_zero2.yaml").read_text().replace(
        "  zero_stage: 2\n", "  zero_stage: 2\n  gradient_accumulation_steps: 1\n  gradient_clipping: 1.0\n"))
    env = _deepspeed_launch_env(old)
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"
    check_accelerate_env(1, 1.0, env)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=1.*remove the key"):
        check_accelerate_env(4, 1.0, env)
    with pytest.raises(ConfigError, match="gradient_clipping=1"):
        check_accelerate_env(1, None, env)
    # the loop refuses before it builds anything
    from rrg3d.train.loop import _make_accelerator
    from rrg3d.train.recipe import load_recipe

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        _make_accelerator(load_recipe("tiny_sft", ["train.gradient_accumulation_steps=4"]))


def test_a_deepspeed_json_with_auto_values_is_completed_and_a_conflicting_one_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    given = tmp_path / "ds.json"
    given.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                 "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(given))
    config = make_deepspeed_plugin(micro_batch=3, accumulation=2, world=2, max_grad_norm=1.0).deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 2, 12, 1.0)
    given.write_text(json.dumps({"gradient_accumulation_steps": 16, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=16"):
        make_deepspeed_plugin(micro_batch=3, accumulation=2, world=2, max_grad_norm=1.0)


# -- per-rank optimizer state ------------------------------------------------------------------------------------------
class DeepSpeedZeroOptimizer:
    """Stands in for DeepSpeed's ZeRO-1/2 optimizer (matched by class name)."""

    def load_state_dict(self, state_dict_list, load_optimizer_states=True, load_from_fp32_weights=False) -> None:
        self.got = (state_dict_list, load_optimizer_states, load_from_fp32_weights)


class DeepSpeedZeroOptimizer_Stage3:  # DeepSpeed's class name (matched by name)
    def load_state_dict(self, state_dict_list, load_optimizer_states=True) -> None:
        self.got = (state_dict_list, load_optimizer_states)


class Wrapper:
    """accelerate's AcceleratedOptimizer / DeepSpeedOptimizerWrapper: the real optimizer under ``.optimizer``."""

    def __init__(self, optimizer: object) -> None:
        self.optimizer = optimizer


def test_each_rank_hands_zero_its_own_partition_at_its_index():
    """ZeRO's load_state_dict takes one state dict per data-parallel rank and reads ``[rank]``: resuming used to hand it
    a single dict. The fp32 master partition comes from the checkpoint, not from the 16-bit weights."""
    zero2, zero3 = DeepSpeedZeroOptimizer(), DeepSpeedZeroOptimizer_Stage3()
    own = {"base_optimizer_state": {}, "single_partition_of_fp32_groups": [torch.zeros(2)]}
    load_zero_optimizer_state(Wrapper(Wrapper(zero2)), own, rank=1, world=3)
    states, optimizer_states, fp32 = zero2.got
    assert states[1] is own and states[0] is None and states[2] is None and optimizer_states and fp32
    load_zero_optimizer_state(Wrapper(zero3), own, rank=0, world=2)
    assert zero3.got[0][0] is own and len(zero3.got[0]) == 2
    with pytest.raises(RuntimeError, match="no DeepSpeed ZeRO optimizer"):
        load_zero_optimizer_state(Wrapper(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)), own, 0, 1)


# -- real runs ---------------------------------------------------------------------------------------------------------
def _zero_env(stage: int) -> dict[str, str]:
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}


@pytest.mark.slow
def test_zero2_and_zero3_on_two_cpu_processes_match_ddp_and_resume_bit_for_bit(tmp_path, base_overrides):
    """tiny_sft, 2 micro-batches per step (DeepSpeed's own accumulation boundary), 3 steps: ZeRO-2 and ZeRO-3 give
    DDP's losses; 2 steps + resume (each process loads its own optimizer partition) equal 3 straight steps exactly.
    About 5 minutes on two CPU cores (ZeRO-3 gathers every layer on every forward)."""
    pytest.importorskip("deepspeed")
    common = [*base_overrides, *QUICK, "phases.0.steps=3", "train.gradient_accumulation_steps=2"]
    ddp = _run(tmp_path, "ddp", "tiny_sft", [*common, f"run_dir={tmp_path / 'ddp'}"], {})
    reference = _weights(tmp_path, "ddp")
    for stage, tolerance in ((2, 1e-6), (3, 1e-4)):  # ZeRO-3's partitioned gradients reduce in another order
        env = _zero_env(stage)
        straight = _run(tmp_path, f"z{stage}", "tiny_sft", [*common, f"run_dir={tmp_path / f'z{stage}'}"], env)
        assert straight["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
        weights = _weights(tmp_path, f"z{stage}")
        assert weights.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=tolerance)
        run = tmp_path / f"z{stage}_resumed"
        _run(tmp_path, f"z{stage}a", "tiny_sft", [*common, "train.stop_after=2", f"run_dir={run}"], env)
        state = run / "checkpoints" / "step_000002" / "train_state"
        assert (state / "optimizer_rank0.pt").is_file() and (state / "optimizer_rank1.pt").is_file()
        trainer = json.loads((state / "trainer.json").read_text())
        assert (trainer["distribution"], trainer["zero_stage"], trainer["world_size"]) == ("deepspeed", stage, 2)
        second = _run(tmp_path, f"z{stage}b", "tiny_sft", [*common, f"run_dir={run}"], env, resume=True)
        assert second["losses"] == straight["losses"][2:]
        resumed = _weights(tmp_path, f"z{stage}b")
        for key in weights:
            assert torch.equal(resumed[key], weights[key]), (stage, key)


@pytest.mark.gpu
def test_zero2_and_zero3_on_two_gpus_resume_bit_for_bit(tmp_path, base_overrides):
    """A few real bf16 steps on two CUDA GPUs (NCCL) for each stage; 2 steps + resume equal 3 straight steps."""
    pytest.importorskip("deepspeed")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    common = [*base_overrides, *QUICK, "phases.0.steps=3", "train.mixed_precision=bf16",
              "train.gradient_accumulation_steps=2"]
    for stage in (2, 3):
        env = _zero_env(stage)
        straight = _run(tmp_path, f"g{stage}", "tiny_sft", [*common, f"run_dir={tmp_path / f'g{stage}'}"], env,
                        cpu=False)
        assert all(torch.isfinite(torch.tensor(straight["losses"])))
        run = tmp_path / f"g{stage}_resumed"
        _run(tmp_path, f"g{stage}a", "tiny_sft", [*common, "train.stop_after=2", f"run_dir={run}"], env, cpu=False)
        second = _run(tmp_path, f"g{stage}b", "tiny_sft", [*common, f"run_dir={run}"], env, cpu=False, resume=True)
        assert second["losses"] == straight["losses"][2:]

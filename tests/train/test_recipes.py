"""Recipes: every shipped recipe loads and names things that exist; overrides are typed and checked; the data
order is seeded, padded to whole steps and split across ranks."""

from __future__ import annotations

import pytest

from rrg3d.errors import ConfigError
from rrg3d.train.loop import epoch_batches, steps_per_epoch
from rrg3d.train.recipe import list_recipes, load_recipe, recipe_from_yaml, validate_references


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_loads_and_its_references_exist(name):
    from rrg3d.models.config import load_model_config
    from rrg3d.preprocess.presets import load_preset

    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    assert validate_references(recipe) == []
    config = load_model_config(recipe.model.config)
    for phase in recipe.phases:
        load_preset(phase.preset if phase.preset is not None else config.preprocess)
    assert recipe_from_yaml(recipe.to_yaml()).fingerprint() == recipe.fingerprint()
    if name.startswith("tiny_"):
        assert recipe.data.manifest is None and recipe.model.config.startswith("tiny_")
        assert sum(p.steps or 0 for p in recipe.phases) <= 8, "tiny recipes stay CPU-fast"


def test_paper_settings_are_recorded():
    clip, lora, full = load_recipe("ctgpt_clip"), load_recipe("ctgpt_sft_lora"), load_recipe("ctgpt_sft_full")
    # the paper's image-encoder stage (appendix B.1, B.3.1); 1e-3 is its Table 4 pre-training (alignment) rate
    assert clip.optim.lr == 1.25e-6 and clip.stage == "clip" and clip.data.batch_size == 4
    assert [p.steps for p in clip.phases] == [6000]
    assert load_recipe("ctgpt_align").optim.lr == 1e-3
    assert lora.optim.lr == 2e-4 and lora.model.train.lm == "lora"
    align = load_recipe("ctgpt_align")
    assert (align.model.lora.r, align.model.lora.alpha) == (128, 256)
    assert full.optim.lr == 2e-5 and full.model.train.lm == "full"
    for recipe in (clip, lora, full, align):
        assert recipe.optim.scheduler == "cosine" and recipe.optim.warmup_ratio == 0.03
    assert [p.preset for p in load_recipe("argus_multiscale_sft").phases] == [
        "multiscale_64", "multiscale_128", "multiscale_256"]


def test_stage_defaults_for_trainable_parts():
    align, sft, clip = load_recipe("tiny_align"), load_recipe("tiny_sft"), load_recipe("tiny_clip")
    assert (align.model.train.encoder, align.model.train.projector, align.model.train.lm) == (False, True, "frozen")
    assert (sft.model.train.lm, sft.model.train.encoder) == ("lora", False)
    assert clip.model.train.encoder is True


def test_overrides_are_typed(tmp_path):
    recipe = load_recipe("tiny_sft", ["optim.lr=3e-5", "phases.0.steps=7", "model.train.encoder=true",
                                      "phases.1={preset: tiny, epochs: 2}", "data.val_split=null",
                                      "model.lora={r: 2, alpha: 4}", "optim.betas=[0.9, 0.95]", "run_dir=x"])
    assert recipe.optim.lr == 3e-5 and isinstance(recipe.optim.lr, float)
    assert recipe.phases[0].steps == 7 and recipe.phases[1].epochs == 2
    assert recipe.model.train.encoder is True and recipe.data.val_split is None
    assert recipe.model.lora.r == 2 and recipe.optim.betas == (0.9, 0.95)
    assert str(recipe.output_dir) == "x"
    assert load_recipe("tiny_sft", ["phases.0.preset.shape=[16, 32, 32]", "phases.0.preset.name=p"]).phases[
        0].preset == {"name": "p", "shape": [16, 32, 32]}


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=1", r"optim.lrr.*known keys here: \[.*'lr'"),
    ("nosuch=1", "unknown recipe key 'nosuch'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.batch_size=1.5", "data.batch_size: expected an integer"),
    ("train.progress=maybe", "train.progress: expected true or false"),
    ("optim.scheduler=exp", "optim.scheduler: must be one of"),
    ("model.train.lm=half", "model.train.lm"),
    ("phases.3.steps=1", "past the end"),
    ("phases.x.steps=1", "is a list"),
    ("optim.lr.x=1", "is a value"),
    ("phases.0.epochs=2", "exactly one of 'steps' or 'epochs'"),
    ("stage=ppo", "stage: must be one of"),
    ("no_equals_sign", "not key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("tiny_sft", [override])


def test_recipe_files_are_checked(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nstage: sft\nmodel: {config: tiny_ctvit_v, colour: red}\n")
    with pytest.raises(ConfigError, match=r"model: unknown key \['colour'\]; known keys"):
        load_recipe(path)
    path.write_text("name: r\nmodel: {config: tiny_ctvit_v}\n")
    with pytest.raises(ConfigError, match="stage"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="not a file and not one of"):
        load_recipe("no_such_recipe")
    path.write_text("stage: clip\nmodel: {config: no_such_architecture}\n")
    assert any("model.config" in p for p in validate_references(load_recipe(path)))
    path.write_text("stage: align\nmodel: {config: tiny_ctvit_v, train: {lm: lora}}\n")
    recipe = load_recipe(path, ["model.config=tiny_resnet3d"])
    assert recipe.name == "r"


def test_epoch_batches_are_seeded_padded_and_sharded():
    one = epoch_batches(6, 2, seed=0, phase=0, epoch=0)
    assert one == epoch_batches(6, 2, seed=0, phase=0, epoch=0)
    assert one != epoch_batches(6, 2, seed=0, phase=0, epoch=1)
    assert sorted(i for b in one for i in b) == list(range(6))
    padded = epoch_batches(5, 2, seed=0, phase=0, epoch=0, multiple=2)
    assert len(padded) == 4 and set(i for b in padded for i in b) == set(range(5))
    ranks = [epoch_batches(6, 1, seed=3, phase=1, epoch=0, world=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert sorted(i for r in ranks for b in r for i in b) == list(range(6))
    assert epoch_batches(6, 2, seed=0, phase=0, epoch=0, skip=2) == one[2:]
    assert steps_per_epoch(6, 1, 1, 2) == 3 and steps_per_epoch(5, 2, 1, 2) == 2


def test_lr_multipliers_give_module_prefixes_their_own_learning_rate() -> None:
    from torch import nn

    from rrg3d.train.loop import _optimizer

    model = nn.ModuleDict({"vision": nn.ModuleDict({"encoder": nn.Linear(4, 4), "projector": nn.Linear(4, 4)}),
                           "text": nn.Linear(4, 4)})
    recipe = load_recipe("tiny_clip", ["optim.lr=0.01", "optim.weight_decay=0.1",
                                       "optim.lr_multipliers={text: 0.1, vision.encoder: 0.5, vision: 2}"])
    optimizer = _optimizer(recipe, model)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model["text"].weight)] == pytest.approx((0.001, 0.1))
    assert lr_of[id(model["text"].bias)] == pytest.approx((0.001, 0.0))  # no decay on biases
    assert lr_of[id(model["vision"]["encoder"].weight)] == pytest.approx((0.005, 0.1))  # longest prefix wins
    assert lr_of[id(model["vision"]["projector"].weight)] == pytest.approx((0.02, 0.1))
    assert len(lr_of) == 6
    with pytest.raises(ConfigError, match="no parameters under"):
        _optimizer(load_recipe("tiny_clip", ["optim.lr_multipliers={txt: 0.1}"]), model)
    with pytest.raises(ConfigError, match="lr_multipliers"):
        load_recipe("tiny_clip", ["optim.lr_multipliers={text: -1}"])


def test_yaml_no_is_the_choice_no_not_false() -> None:
    assert load_recipe("tiny_sft", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="must be one of"):
        load_recipe("tiny_sft", ["train.mixed_precision=yes"])

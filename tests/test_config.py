"""Config: presets and ``extends``, dotted overrides type-checked against the dataclass fields, save/load."""

from __future__ import annotations

import json

import pytest

from metagrad import config as C
from metagrad import rundir


def test_every_preset_resolves():
    names = C.presets()
    assert {"sinusoid-5shot", "sinusoid-10shot", "sinusoid-20shot", "harmonic-5shot", "harmonic-10shot"} <= set(names)
    for name in names:
        cfg = C.resolve(name)
        assert cfg.name == name


def test_sinusoid_presets_follow_finn():
    cfg = C.resolve("sinusoid-10shot")
    assert (cfg.benchmark.name, cfg.benchmark.shots, cfg.benchmark.queries) == ("sinusoid", 10, 10)
    assert (cfg.model.name, cfg.model.kwargs) == ("mlp", {})   # Finn's 40-40: the MLP's default widths
    assert (cfg.maml.inner_lr, cfg.maml.inner_steps, cfg.maml.eval_inner_steps) == (0.01, 1, 10)
    assert (cfg.train.meta_batch_size, cfg.train.meta_lr) == (25, 1e-3)
    assert cfg.eval.inner_steps == [0, 1, 10] and cfg.eval.tasks == 600
    five, harmonic = C.resolve("sinusoid-5shot"), C.resolve("harmonic-10shot")
    assert five.benchmark.shots == 5 and harmonic.benchmark.name == "harmonic"
    # `extends` changes only what the child sets.
    assert C.diff(cfg, five) == ["name", "benchmark.shots"]


def test_overrides_are_parsed_to_the_field_types():
    cfg = C.resolve("sinusoid-10shot", [
        "train.iterations=7", "maml.inner_lr=1e-2", "maml.first_order=true", "train.grad_clip=none",
        "eval.inner_steps=0,5", "model.hidden=[20, 20, 20]", "maml.eval_inner_steps=null", "plugins=cml,meta_gna",
        "plugin_args.cml.weight=0.5", "plugin_args.cml.head=linear", "benchmark.kwargs.val_fraction=0.3",
        "train.threads=None",
    ])
    assert cfg.train.iterations == 7 and cfg.maml.inner_lr == 0.01 and cfg.maml.first_order is True
    assert cfg.train.grad_clip is None and cfg.maml.eval_inner_steps is None and cfg.train.threads is None
    assert cfg.eval.inner_steps == [0, 5] and cfg.model.kwargs == {"hidden": [20, 20, 20]}
    assert cfg.plugins == ["cml", "meta_gna"]
    assert cfg.plugin_args == {"cml": {"weight": 0.5, "head": "linear"}}
    assert cfg.benchmark.kwargs == {"val_fraction": 0.3}
    assert C.resolve("sinusoid-10shot", ["plugins="]).plugins == []


def test_unknown_key_suggests_close_matches():
    with pytest.raises(C.ConfigError, match=r"unknown config key 'train.iteratons' \(did you mean: train.iterations"):
        C.resolve("sinusoid-10shot", ["train.iteratons=5"])
    with pytest.raises(C.ConfigError, match="unknown config key 'trian.seed'.*train.seed"):
        C.resolve("sinusoid-10shot", ["trian.seed=1"])
    with pytest.raises(C.ConfigError, match="has no sub-keys"):
        C.resolve("sinusoid-10shot", ["train.seed.x=1"])


@pytest.mark.parametrize("item, expected", [
    ("train.iterations=abc", "expected int"),
    ("train.iterations=1.5", "expected int"),
    ("maml.inner_lr=fast", "expected float"),
    ("maml.first_order=maybe", "expected bool"),
    ("eval.inner_steps=0,x", "expected list of int"),
    ("train.grad_clip=big", "expected float or none"),
])
def test_wrong_type_names_the_expected_type(item, expected):
    with pytest.raises(C.ConfigError, match=expected) as err:
        C.resolve("sinusoid-10shot", [item])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("item, message", [
    ("maml.adapt=some", "maml.adapt: expected one of"),
    ("train.iterations=0", "train.iterations: must be >= 1"),
    ("maml.inner_lr=-1", "maml.inner_lr: must be > 0"),
    ("plugin_args.cml.weight=1", "plugin_args.cml is set but 'cml' is not in plugins"),
    ("plugins=cml,cml", "names a plug-in twice"),
    ("train.seed", "--set expects key=value"),
    ("train=3", "train is a section"),
])
def test_values_are_validated(item, message):
    with pytest.raises(C.ConfigError, match=message):
        C.resolve("sinusoid-10shot", [item])


def test_unknown_preset_lists_close_names():
    with pytest.raises(C.ConfigError, match="unknown preset 'sinusoid-10shots' .*sinusoid-10shot"):
        C.resolve("sinusoid-10shots")


def test_toml_file_with_relative_extends_and_bad_keys(tmp_path):
    (tmp_path / "base.toml").write_text('extends = "sinusoid-10shot"\n[train]\niterations = 11\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[maml]\ninner_steps = 2\n')
    cfg = C.resolve(str(tmp_path / "child.toml"))
    assert (cfg.name, cfg.train.iterations, cfg.maml.inner_steps, cfg.benchmark.name) == ("child", 11, 2, "sinusoid")
    (tmp_path / "bad.toml").write_text('[train]\niterations = "many"\n')
    with pytest.raises(C.ConfigError, match="train.iterations: expected int, got 'many'"):
        C.resolve(str(tmp_path / "bad.toml"))
    (tmp_path / "typo.toml").write_text('[trian]\nseed = 1\n')
    with pytest.raises(C.ConfigError, match="unknown config key 'trian'"):
        C.resolve(str(tmp_path / "typo.toml"))
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(C.ConfigError, match="extends itself"):
        C.resolve(str(tmp_path / "loop.toml"))
    (tmp_path / "broken.toml").write_text('[train\n')
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.resolve(str(tmp_path / "broken.toml"))


def test_save_and_load_round_trip(tmp_path):
    cfg = C.resolve("harmonic-5shot", ["plugins=cml", "plugin_args.cml.weight=0.25", "train.grad_clip=10"])
    rundir.write_config(tmp_path, cfg)
    assert json.loads((tmp_path / "config.json").read_text())["plugin_args"] == {"cml": {"weight": 0.25}}
    assert C.load(tmp_path / "config.json") == cfg
    assert C.resolve(json.loads((tmp_path / "config.json").read_text())) == cfg


def test_eval_steps_default_by_task_type():
    cfg = C.resolve("sinusoid-10shot", ["eval.inner_steps=none"])
    assert cfg.eval_steps("regression") == [0, 1, 10]
    assert cfg.eval_steps("classification") == [10]
    cfg.maml.eval_inner_steps = None
    assert cfg.eval_steps("classification") == [1]


def test_all_keys_are_dotted_and_settable():
    keys = C.all_keys()
    assert {"train.iterations", "train.meta_batch_size", "train.seed", "maml.inner_lr", "maml.inner_steps",
            "maml.first_order", "plugins"} <= set(keys)


def test_eval_queries_apply_to_validation_and_test_only():
    from metagrad.evaluation import make_benchmark

    cfg = C.resolve("sinusoid-10shot", ["benchmark.queries=4", "eval.queries=7"])
    shapes = {split: make_benchmark(cfg, split, 0, 2).batch(0).query_x.shape[1] for split in ("train", "val", "test")}
    assert shapes == {"train": 4, "val": 7, "test": 7}
    default = C.resolve("sinusoid-10shot", ["benchmark.queries=4"])
    assert make_benchmark(default, "test", 0, 2).batch(0).query_x.shape[1] == 4
    with pytest.raises(C.ConfigError, match="eval.queries"):
        C.resolve("sinusoid-10shot", ["eval.queries=0"])


def test_budget_preset_trains_on_few_queries_and_scores_on_fifteen():
    cfg = C.resolve("omniglot-5w1s-budget60")
    assert (cfg.benchmark.queries, cfg.eval.queries, cfg.train.time_budget_min) == (2, 15, 55)
    assert (cfg.maml.inner_lr, cfg.maml.inner_steps, cfg.maml.eval_inner_steps) == (0.4, 1, 3)
    assert (cfg.train.meta_batch_size, cfg.train.meta_lr, cfg.model.kwargs) == (16, 1e-3, {})  # Conv4's 64
    # The late drop of the meta step size: 1e-3, then 1e-4 for the last 20% of the 5,200 steps.
    assert (cfg.train.meta_lr_schedule, cfg.train.meta_lr_min, cfg.train.iterations) == ("step", 1e-4, 5200)
    assert cfg.train.meta_lr_step_at == 0.8


# ------------------------------------------------------------------------------------------------ limits
def test_limits_are_declared_beside_their_fields_and_read_by_their_users():
    """One definition of every choice: validation and the modules that act on a value read the same tuple."""
    from metagrad import checks, inner_lr

    limits = C.limits()
    assert set(limits) <= set(C.all_keys())
    assert {k for k, lim in limits.items() if "choices" in lim} == {
        "maml.adapt", "maml.learn_inner_lr", "train.meta_lr_schedule", "train.precision", "eval.split", "eval.head"}
    assert C.choices("maml.adapt") == C.ADAPT and C.choices("eval.head") == C.HEADS
    assert C.choices("maml.learn_inner_lr") == C.INNER_LR_MODES
    # The learner's checks and inner_lr refuse exactly what the config refuses (the same tuple).
    assert (checks.ADAPT, inner_lr.MODES) == (C.ADAPT, C.INNER_LR_MODES)
    for key, lim in limits.items():
        section, name = key.split(".")
        default = getattr(C.Config(), section).__dict__[name]
        assert "choices" not in lim or default in lim["choices"], key
        assert "min" not in lim or default is None or min(default if isinstance(default, list) else [default]) \
            >= lim["min"], key


@pytest.mark.parametrize("item, message", [
    ("maml.learn_inner_lr=per_layer", "maml.learn_inner_lr: expected one of fixed, per_step, per_element"),
    ("benchmark.image_size=0", "benchmark.image_size: must be >= 1, got 0"),
    (f"train.seed={2**31}", f"train.seed: must be >= 0 and <= {2**31 - 1}"),
    ("train.time_budget_min=inf", "train.time_budget_min: must be > 0 and finite, got inf"),
    ("train.meta_lr_min=-1", r"train.meta_lr_min: must be >= 0 and finite \(the schedule's last step size\)"),
    ("train.meta_lr_step_at=1.5", r"train.meta_lr_step_at: a fraction of train.iterations in \[0, 1\], got 1.5"),
    ("eval.inner_steps=[]", r"eval.inner_steps: expected a non-empty list of counts >= 0, got \[\]"),
])
def test_every_kind_of_limit_is_checked_with_its_message(item, message):
    with pytest.raises(C.ConfigError, match=message) as err:
        C.resolve("sinusoid-10shot", [item])
    assert "\n" not in str(err.value)


def test_the_evaluation_step_count_is_derived_once():
    cfg = C.resolve("sinusoid-10shot", ["maml.inner_steps=2", "maml.eval_inner_steps=none", "eval.inner_steps=none"])
    assert cfg.test_steps == 2 and cfg.eval_steps("regression") == [0, 1, 2] and cfg.eval_steps("classification") == [2]
    cfg.maml.eval_inner_steps = 5
    assert cfg.test_steps == 5 and cfg.eval_steps("classification") == [5]
    cfg.eval.inner_steps = [0, 3]
    assert cfg.eval_steps("regression") == [0, 3] and cfg.test_steps == 5

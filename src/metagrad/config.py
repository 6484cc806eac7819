"""Run configuration: nested dataclasses, TOML presets with ``extends``, dotted type-checked overrides.

A run is fully described by one :class:`Config`. Presets are small TOML files in ``metagrad/configs/`` (the
repository's ``configs/`` links there) loaded by name or path; ``--set section.key=value`` overrides are
checked against the field types below, and the resolved config is saved as ``config.json`` in the run
directory so the run can be resumed, re-evaluated or repeated from it alone.

Example:
    >>> cfg = resolve("sinusoid-10shot", ["train.iterations=200", "maml.first_order=true"])
    >>> cfg.train.iterations, cfg.maml.inner_lr, cfg.eval.inner_steps
    (200, 0.01, [0, 1, 10])
    >>> cfg.plugins
    []
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .reading import FileFormatError, check_value, read_json, read_toml

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A bad preset, key or value; the message is one line that says what to change."""


# The allowed values of the fields that take a name; the modules that act on them import them from here.
LEARNERS = ("maml", "protonet")                        # learners (their registry, metagrad.learners)
NO_INNER_LOOP = ("protonet",)                          # learners whose `inner_loop` is False: scored after 0 steps
WRAPPERS = ("tnet",)                                   # models.wrappers: T-Net
ADAPT = ("all", "no_norm", "head", "body")             # maml, functional.ADAPTED_ROLES
INNER_LR_MODES = ("fixed", "per_step", "per_element")  # inner_lr
SCHEDULES = ("constant", "cosine", "step", "halving")
PRECISIONS = ("fp32", "bf16")
SPLITS = ("train", "val", "test")
HEADS = ("auto", "trained", "prototype", "mean")     # evaluation.heads


def _f(default: Any, **limits: Any) -> Any:
    """A field with its limits beside it, read by :func:`validate`: ``choices`` (allowed values), ``min`` (ints
    and every element of a list of ints, at most 2³¹−1; a float is also finite), ``positive`` (finite and > 0),
    ``max`` / ``below`` (inclusive / exclusive upper bound of a float), ``most`` (of an int), ``f32`` (finite
    in float32: a step size); ``why`` names what the value is in the message. A
    list-typed field spells out ``field(default_factory=..., metadata={...})``."""
    return field(default=default, metadata=limits)


@dataclass
class BenchmarkConfig:
    name: str = "sinusoid"              # a registered benchmark: `metagrad list benchmarks`
    ways: int = _f(5, min=1)            # classes per task (regression ignores it)
    shots: int = _f(10, min=1)          # support samples per class (points, for regression)
    queries: int = _f(10, min=1)        # query samples per class: what the outer loss is measured on
    data_root: str | None = None        # folder of the data files; None: the benchmark's default lookup
    image_size: int | None = _f(None, min=1)  # resize images to this side; None: the benchmark's standard size
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other data.create argument, passed as is


@dataclass
class ModelConfig:
    name: str = "auto"                  # a built-in (`metagrad list models`: mlp, conv4, gcn), an import path
                                        # `package.module:factory`, or an entry point of group metagrad.models;
                                        # auto: mlp for regression, gcn for graphs, else conv4
    kwargs: dict[str, Any] = field(default_factory=dict)  # the model's own arguments, passed to its factory
                                        # (conv4: width 64, bias false, pool "max" | "stride" | "none"; mlp:
                                        # hidden [40, 40]; gcn: hidden 16, dropout 0)
    wrap: list[str] = field(default_factory=list)  # wrappers around the built model, innermost first: tnet
                                        # (T-Net, a meta-learned transform after every layer, never adapted)


# Model keys of configs written before `model.kwargs` (every run's config.json holds all five): read into
# `model.kwargs`, except a value equal to its old default (the factories' own); a key the built model does not
# take is ignored, as it always was (metagrad.build.make_model).
LEGACY_MODEL_KEYS: dict[str, tuple[Any, Any]] = {"hidden": (list[int], [40, 40]), "width": (int, 64),
                                                 "bias": (bool, False), "pool": (str, "max"), "dropout": (float, 0.0)}


@dataclass
class MAMLConfig:
    inner_lr: float = _f(0.4, positive=True)  # α; Finn: 0.4 Omniglot 5-way, 0.01 sinusoid and mini-ImageNet
    inner_steps: int = _f(1, min=1)     # inner steps in meta-training (the second-order graph grows with it)
    eval_inner_steps: int | None = _f(None, min=0)  # inner steps at evaluation; None: same as inner_steps
    first_order: bool = False           # FOMAML: drop second-order terms (cheaper, nearly as good)
    adapt: str = _f("all", choices=ADAPT)  # all | no_norm | head (ANIL) | body (BOIL): which tensors the inner
                                        # loop updates (T-Net's transforms never)
    learn_inner_lr: str = _f("fixed", choices=INNER_LR_MODES)  # fixed | per_step (MAML++ LSLR) | per_element
                                        # (Meta-SGD)
    multi_step_loss: bool = False       # MAML++ MSL: query loss after every inner step, annealed to the last
    msl_iterations: int = _f(0, min=0)  # iterations over which MSL weights anneal to the last step
    first_order_iterations: int = _f(0, min=0)  # MAML++: first order for this many iterations, then second order


@dataclass
class TrainConfig:
    iterations: int = _f(60000, min=1)  # meta-updates; Finn: 60k (images), 70k (sinusoid)
    meta_batch_size: int = _f(32, min=1)  # tasks per meta-update
    meta_lr: float = _f(1e-3, positive=True, f32=True)  # Adam step size on θ and the plug-ins' parameters
    meta_lr_schedule: str = _f("constant", choices=SCHEDULES)  # constant | cosine: anneal meta_lr to meta_lr_min
                                        # over `iterations` (MAML++'s cosine annealing, Antoniou et al. 2019) |
                                        # step: meta_lr, then meta_lr_min from iteration meta_lr_step_at · iterations on |
                                        # halving: halved every meta_lr_halve_every iterations
    meta_lr_min: float = _f(1e-5, min=0, f32=True, why="the schedule's last step size")  # the cosine schedule's final step
                                        # size (MAML++: 1e-5), the step schedule's second one; a negative one would
                                        # be gradient ascent
    meta_lr_step_at: float = _f(0.8, min=0, max=1, why="a fraction of train.iterations")  # step schedule: the
                                        # fraction of `iterations` at which it drops
    meta_lr_halve_every: int = _f(2000, min=1)  # halving schedule: meta_lr · 0.5^⌊it / this⌋ (Snell et al.
                                        # 2017: every 2,000 episodes); independent of `iterations`, so a longer
                                        # budget continues the same trajectory
    seed: int = _f(0, min=0)            # model initialisation and the training task stream
    grad_clip: float | None = _f(None, positive=True)  # clip the meta-gradient's global norm; None: no clipping
    log_every: int = _f(100, min=1)     # iterations per metrics.jsonl line (values averaged over the window)
    val_every: int = _f(1000, min=0)    # iterations between validations; 0: never
    val_tasks: int = _f(100, min=1)     # val tasks per validation: enough to see a trend, cheap to run
    checkpoint_every: int = _f(1000, min=0)  # iterations between checkpoints (and always at the end); 0: end only
    keep_checkpoints: int = _f(3, min=0)  # numbered copies kept beside checkpoint.pt: a corrupt newest one falls
                                        # back to the previous good one (0: checkpoint.pt alone)
    max_bad_steps: int = _f(5, min=1)   # meta-updates in a row with a non-finite loss or gradient (each skipped,
                                        # no update) before the run stops with an error
    device: str = "auto"                # cpu | cuda | cuda:N | auto (cuda when available)
    threads: int | None = _f(None, min=1, most=1024)  # torch CPU threads; small models run fastest on 1 (less sync overhead)
    time_budget_min: float | None = _f(None, positive=True)  # stop (checkpoint, then evaluate) once the run's wall
                                        # time reaches this many minutes, even before `iterations`; None: no budget
    precision: str = _f("fp32", choices=PRECISIONS)  # fp32 | bf16: autocast the meta-training matmuls/convs to
                                        # bfloat16; parameters, inner updates and losses stay fp32
                                        # (docs/distributed.md)


@dataclass
class EvalConfig:
    tasks: int = _f(600, min=1)         # test tasks: the field's protocol (mean ± 95% CI over tasks)
    inner_steps: list[int] | None = field(default=None, metadata={"min": 0})  # steps to report; None: [0, 1,
                                        # eval] for regression, [eval] else
    split: str = _f("test", choices=SPLITS)  # the final evaluation's split
    seed: int = _f(0, min=0)            # val/test stream seed, fixed so every run is scored on the same tasks
    meta_batch_size: int | None = _f(None, min=1)  # tasks per evaluation batch; None: train.meta_batch_size
    queries: int | None = _f(None, min=1)  # query samples per class in validation and test; None: benchmark.queries
                                        # (train on few queries for speed, score on the usual 15)
    ways: int | None = _f(None, min=2)  # classification: ways of the final evaluation and of `metagrad eval`;
                                        # None: the benchmark's own (e.g. 20 for omniglot-lake20), else training's
    head: str = _f("auto", choices=HEADS)  # the head a classifier starts each evaluated task from: trained (its
                                        # own rows; training's ways only) | prototype (Proto-MAML: the support
                                        # set's class prototypes, Triantafillou et al. 2020) | mean (every row the
                                        # mean of the trained rows) | auto: trained at training's ways, else
                                        # prototype (docs/own-data.md measures them)


@dataclass
class Config:
    name: str = "custom"                # preset name: names the default run directory
    learner: str = _f("maml", choices=LEARNERS)  # maml (ANIL, BOIL, Meta-SGD, T-Net by its settings) | protonet
                                        # (classification; no inner loop, reads no maml.* key)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plugins: list[str] = field(default_factory=list)  # registry keys, applied in order: `metagrad list methods`
    plugin_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # per plug-in kwargs, by key

    @property
    def train_steps(self) -> int:
        """The inner-step count of meta-training: ``maml.inner_steps``, 0 for a learner without inner loop."""
        return 0 if self.learner in NO_INNER_LOOP else self.maml.inner_steps

    @property
    def test_steps(self) -> int:
        """The inner-step count of evaluation and validation: ``maml.eval_inner_steps``, else ``maml.inner_steps``.

        The one place it is derived: training's validation, the final evaluation, the diagnostics and the report
        all read it here. A learner without inner loop (ProtoNet) is scored after 0 steps."""
        if self.learner in NO_INNER_LOOP:
            return 0
        return self.maml.inner_steps if self.maml.eval_inner_steps is None else self.maml.eval_inner_steps

    def eval_steps(self, task_type: str) -> list[int]:
        """The inner-step counts reported at evaluation (see :attr:`EvalConfig.inner_steps`)."""
        if self.eval.inner_steps is not None:
            return list(self.eval.inner_steps)
        k = self.test_steps
        return sorted({0, 1, k}) if task_type == "regression" else [k]


_INT_MAX = 2**31 - 1  # counts beyond this are typos; torch's sizes and seeds overflow past them
_F32_MAX = 3.4028234663852886e38  # the largest finite float32


# ------------------------------------------------------------------------------------------------ presets
def presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw dict of a preset (name in ``metagrad/configs`` or a ``.toml`` path), ``extends`` merged in."""
    path = Path(name_or_path).expanduser()
    if not (path.suffix == ".toml" or path.is_file()):
        path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}{_did_you_mean(name_or_path, presets())}; "
                              f"or pass a .toml path")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    key = str(path.resolve())
    if key in _seen:
        raise ConfigError(f"preset {path.stem!r} extends itself through {' -> '.join(Path(s).stem for s in _seen)}")
    try:
        raw = read_toml(path)
    except FileFormatError as e:
        raise ConfigError(str(e)) from None
    if not raw:  # an empty file would silently run the defaults (60,000 iterations)
        raise ConfigError(f"{path}: the config file is empty; give it settings or 'extends = \"PRESET\"'")
    raw.setdefault("name", path.stem)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a preset name or path, got {parent!r}")
    if parent.endswith(".toml") and not Path(parent).is_absolute():
        parent = str(path.parent / parent)
    try:
        base = load_preset(parent, (*_seen, key))
    except ConfigError as e:
        if str(e).startswith(("unknown preset", "config file")):  # the missing parent itself: say who names it
            raise ConfigError(f"{path}: extends {parent!r}: {e}") from e
        raise
    return _merge(base, raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------------------- building, types
def resolve(preset: str | dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """A checked :class:`Config` from a preset (name, path or raw dict) and ``key=value`` overrides."""
    cfg = from_dict(load_preset(preset) if isinstance(preset, str) else preset)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        set_value(cfg, key.strip(), value.strip())
    validate(cfg)
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts (a preset or a saved ``config.json``), checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a table of sections, got {'null' if raw is None else type(raw).__name__}")
    cfg = Config()
    for key, value in raw.items():
        set_value(cfg, key, value)
    return cfg


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set dotted ``key`` to ``value`` (a string from the command line, or a TOML/JSON value), type-checked.

    A section takes a dict of its keys. Keys below a dict-typed field (``plugin_args.cml.weight``,
    ``benchmark.kwargs.val_fraction``) are free-form: string values are read as int, float, bool, none or JSON
    when they look like one.
    """
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(Config)
    if head not in hints:
        raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, all_keys())}")
    obj, name, tp = cfg, head, hints[head]
    if dataclasses.is_dataclass(tp):
        if not rest:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section: set its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}")
            for k, v in value.items():
                set_value(cfg, f"{key}.{k}", v)
            return
        name, _, rest = rest.partition(".")
        obj, tp = getattr(cfg, head), typing.get_type_hints(tp).get(name)
        if head == "model" and name in LEGACY_MODEL_KEYS and not rest:
            _set_legacy_model_key(cfg.model, name, value, key)
            return
        if tp is None:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, all_keys())}")
    if not rest:
        setattr(obj, name, coerce(value, tp, key))
        return
    if typing.get_origin(tp) is not dict:
        raise ConfigError(f"unknown config key {key!r}: {key[: -len(rest) - 1]} has no sub-keys")
    d = getattr(obj, name)
    *parents, last = rest.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{key}: {p!r} already holds a value, not a table")
    d[last] = _literal(value) if isinstance(value, str) else value


def _set_legacy_model_key(model: ModelConfig, name: str, value: Any, key: str) -> None:
    tp, default = LEGACY_MODEL_KEYS[name]
    value = coerce(value, tp, key)
    if value != default or name in model.kwargs:  # an old default is the factories' own: nothing to pass
        model.kwargs[name] = value


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to type ``tp`` (str from the command line, or a TOML/JSON value), or ConfigError."""
    try:
        return _convert(value, tp)
    except OverflowError:   # an integer too big for a float (400 digits)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got an integer of {len(str(value))} digits, too big "
                          "for a number") from None
    except (TypeError, ValueError, KeyError, RecursionError):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r:.60}") from None


def _convert(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)))
    if tp in _SCALARS:
        if isinstance(value, str) and tp is not str:
            return _BOOLS[value.lower()] if tp is bool else tp(value)
        # TOML true is not a number, and 1.5 is not an int.
        if not isinstance(value, _SCALARS[tp]) or (isinstance(value, bool) and tp is not bool):
            raise TypeError(tp)
        return tp(value)
    if origin is list:
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            value = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(tp)
        return [_convert(v, args[0]) for v in value]
    if origin is dict:
        value = json.loads(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise TypeError(tp)
        return dict(value)
    raise TypeError(f"unsupported field type {tp!r}")  # pragma: no cover - a bug in this module


_SCALARS: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _literal(text: str) -> Any:
    """A free-form string as the value it looks like: int, float, bool, None, JSON list/object, else str."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text[:1] in "[{":
        try:
            return check_value("--set", json.loads(text))
        except (ValueError, RecursionError):   # not JSON, or nested too deeply: the text itself
            pass
    return text


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])} (comma-separated)"
    if origin is dict:
        return "table of key=value"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def all_keys() -> list[str]:
    """Every dotted config key, e.g. ``train.iterations``."""
    keys = []
    for name, tp in typing.get_type_hints(Config).items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else [name]
    return keys


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def limits() -> dict[str, Mapping[str, Any]]:
    """Every dotted config key that has limits (allowed values, bounds) → them, as declared beside its field."""
    out: dict[str, Mapping[str, Any]] = {}
    for name, tp in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(tp):
            out.update({f"{name}.{f.name}": f.metadata for f in dataclasses.fields(tp) if f.metadata})
    return out


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of ``key`` (e.g. ``maml.adapt``), as declared beside its field."""
    return tuple(limits()[key]["choices"])


def validate(cfg: Config) -> None:
    """Range and choice checks the types cannot express (the limits beside each field); raises ConfigError
    naming the key. Checked kind by kind: choices, counts, step sizes, other bounded numbers, lists of counts."""
    found = [(key, lim, _get(cfg, key)) for key, lim in limits().items()]
    for key, lim, v in found:
        if "choices" in lim and v not in lim["choices"]:
            raise ConfigError(f"{key}: expected one of {', '.join(lim['choices'])}, got {v!r}")
    for key, lim, v in found:
        if "min" in lim and isinstance(v, int) and not isinstance(v, bool) and not lim["min"] <= v <= _INT_MAX:
            low = lim["min"]
            raise ConfigError(f"{key}: must be >= {low}{'' if v < low else f' and <= {_INT_MAX}'}, got {v}")
    for key, lim, v in found:
        if lim.get("positive") and v is not None and not (0 < v < math.inf):  # also refuses nan and inf
            raise ConfigError(f"{key}: must be > 0 and finite, got {v}")
    for key, lim, v in found:
        if isinstance(v, float) and "min" in lim:
            _check_bounds(key, lim, v)
    for key, lim, v in found:  # Adam applies the step size in float32: beyond its range, inf mid-update
        if lim.get("f32") and v is not None and not abs(v) <= _F32_MAX:
            raise ConfigError(f"{key}: must be at most {_F32_MAX:.4g} (a step size finite in float32), got {v}")
    for key, lim, v in found:  # a count whose value is a resource (threads): beyond, the allocator fails
        if "most" in lim and v is not None and v > lim["most"]:
            raise ConfigError(f"{key}: must be <= {lim['most']}, got {v}")
    for key, lim, v in found:
        if "min" in lim and isinstance(v, list) and (not v or not all(lim["min"] <= n <= _INT_MAX for n in v)):
            raise ConfigError(f"{key}: expected a non-empty list of counts >= {lim['min']}, got {v}")
    if cfg.train_steps == 0 and cfg.eval.inner_steps not in (None, [0]):
        raise ConfigError(f"eval.inner_steps: learner={cfg.learner} has no inner loop, so it is scored after 0 steps "
                          f"only, got {cfg.eval.inner_steps}: leave eval.inner_steps unset")
    unknown = [w for w in cfg.model.wrap if w not in WRAPPERS]
    if unknown:
        raise ConfigError(f"model.wrap: unknown wrapper {unknown[0]!r}: choose among {', '.join(WRAPPERS)}")
    if len(set(cfg.plugins)) != len(cfg.plugins):
        raise ConfigError(f"plugins: {cfg.plugins} names a plug-in twice")
    for name, kwargs in cfg.plugin_args.items():
        if name not in cfg.plugins:
            raise ConfigError(f"plugin_args.{name} is set but {name!r} is not in plugins {cfg.plugins}: add it "
                              f"with --set plugins={','.join([*cfg.plugins, name])}")
        if not isinstance(kwargs, dict):
            raise ConfigError(f"plugin_args.{name}: expected a table of key=value, got {kwargs!r}")


def _check_bounds(key: str, lim: Mapping[str, Any], v: float) -> None:
    """A float field with bounds that is not a step size: the schedule's floor, its drop point, the dropout rate
    (nan fails every comparison, so it is refused too)."""
    low = lim["min"]
    if "max" in lim and not low <= v <= lim["max"]:
        raise ConfigError(f"{key}: {lim['why']} in [{low}, {lim['max']}], got {v}")
    if "below" in lim and not low <= v < lim["below"]:
        raise ConfigError(f"{key}: {lim['why']} in [{low}, {lim['below']}), got {v}")
    if not low <= v < math.inf:
        raise ConfigError(f"{key}: must be >= {low} and finite ({lim['why']}), got {v}")


# ------------------------------------------------------------------------------------------------ saving
def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (JSON-ready)."""
    return dataclasses.asdict(cfg)


def dumps(cfg: Config) -> str:
    """The resolved config as JSON text (the stdlib has no TOML writer; JSON reads back the same through
    :func:`load`). :func:`metagrad.rundir.write_config` writes it into a run directory atomically."""
    return json.dumps(to_dict(cfg), indent=2) + "\n"


def load(path: str | Path) -> Config:
    """Read a saved ``config.json`` back into a checked Config."""
    try:
        raw = read_json(path, dict)
    except OSError as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e}") from e
    except FileFormatError as e:
        raise ConfigError(str(e)) from None
    try:
        cfg = from_dict(raw)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (dict-typed fields compared key by key)."""
    fa, fb = _leaves(to_dict(a)), _leaves(to_dict(b))
    return [k for k in dict.fromkeys([*fa, *fb]) if fa.get(k, _MISSING) != fb.get(k, _MISSING)]


_MISSING = object()


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


__all__ = ["ADAPT", "HEADS", "INNER_LR_MODES", "LEARNERS", "PRECISIONS", "SCHEDULES", "SPLITS", "WRAPPERS",
           "BenchmarkConfig",
           "Config", "ConfigError", "EvalConfig", "MAMLConfig", "ModelConfig", "TrainConfig", "all_keys", "choices",
           "diff", "dumps", "from_dict", "limits", "load", "load_preset", "presets", "resolve", "set_value",
           "to_dict", "validate"]

"""Building a run's objects from its config: an argument the callee does not take is a one-line ConfigError that
names it (checked against the callee's signature), and a TypeError raised inside a benchmark or a plug-in (a bug)
stays a TypeError."""

from __future__ import annotations

import pytest

from metagrad import config as C
from metagrad import data, methods
from metagrad.data.regression import Sinusoid
from metagrad.evaluation import make_benchmark, make_learner
from metagrad.methods.cml import CML

SMALL = ["train.meta_batch_size=2"]


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("item, name", [("benchmark.kwargs.nope=1", "nope"), ("benchmark.image_size=28", "image_size")])
def test_an_argument_the_benchmark_does_not_take_is_named(item, name):
    cfg = C.resolve("sinusoid-10shot", [*SMALL, item])
    with pytest.raises(C.ConfigError) as err:
        make_benchmark(cfg, "train", 0, 2)
    assert f"benchmark 'sinusoid' takes no argument {name!r}" in one_line(err) and "shared_pool" in str(err.value)


def test_a_benchmark_that_takes_any_argument_is_not_second_guessed():
    assert data.arguments("sinusoid") is not None and "pool" in data.arguments("sinusoid")
    assert {"fold", "val_fraction", "feature_norm"} <= set(data.arguments("cora"))   # its factory's real signature
    with pytest.raises(ValueError, match="unknown benchmark 'sinusoidal'"):
        data.arguments("sinusoidal")


def test_a_type_error_inside_a_benchmark_is_not_called_a_config_error(monkeypatch):
    def broken(split="train", ways=5, shots=10, queries=10, meta_batch_size=2, seed=0, root=None, pool=None,
               shared_pool=False):
        return Sinusoid(split=split, shots=shots + root, queries=queries,  # a bug: root is None here
                        meta_batch_size=meta_batch_size, seed=seed)

    monkeypatch.setitem(data._REGISTRY, "sinusoid", broken)
    cfg = C.resolve("sinusoid-10shot", SMALL)
    with pytest.raises(TypeError, match="unsupported operand") as err:
        make_benchmark(cfg, "train", 0, 2)
    assert not isinstance(err.value, C.ConfigError)


def test_an_argument_the_plugin_does_not_take_is_named():
    cfg = C.resolve("sinusoid-10shot", [*SMALL, "plugins=cml", "plugin_args.cml.wieght=0.5"])
    bench = make_benchmark(cfg, "train", 0, 2)
    with pytest.raises(C.ConfigError) as err:
        make_learner(cfg, bench)
    assert "plugin_args.cml: cml takes no argument 'wieght'" in one_line(err)


def test_a_type_error_inside_a_plugin_is_not_called_a_config_error(monkeypatch):
    class Broken(CML):
        def __init__(self, weight: float = 1.0, head: str = "mlp") -> None:
            super().__init__(weight, head)
            raise TypeError("unsupported operand type(s): a bug inside the plug-in")

    monkeypatch.setitem(methods._REGISTRY, "cml", Broken)
    cfg = C.resolve("sinusoid-10shot", [*SMALL, "plugins=cml", "plugin_args.cml.weight=0.5"])
    bench = make_benchmark(cfg, "train", 0, 2)
    with pytest.raises(TypeError, match="a bug inside the plug-in") as err:
        make_learner(cfg, bench)
    assert not isinstance(err.value, C.ConfigError)

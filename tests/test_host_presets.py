"""The hosts from the command line: `metagrad list` shows each learner's plug-ins, and `metagrad train` runs every
host preset alone and with each plug-in it supports (tiny budget); bad combinations exit 2 with one line."""

from __future__ import annotations

import json

import pytest

from metagrad import cli, config, functional, learners, methods, models
from metagrad.data.images import default_root

HOSTS = {"omniglot-5w1s-cpu": "maml", "anil-omniglot-5w1s-cpu": "maml", "boil-omniglot-5w1s-cpu": "maml",
         "meta_sgd-omniglot-5w1s-cpu": "maml", "tnet-omniglot-5w1s-cpu": "maml",
         "protonet-omniglot-5w1s-cpu": "protonet"}
REFUSED = {("anil-omniglot-5w1s-cpu", "cxgrad")}   # CxGrad rescales adapted conv weights; ANIL adapts none
SMALL = ["train.iterations=2", "train.log_every=1", "train.val_every=0", "eval.tasks=4", "train.meta_batch_size=4",
         "model.width=8", "train.threads=1", "eval.queries=2"]
RUNS = [(p, k) for p, host in HOSTS.items() for k in [None, *methods.available()]
        if k is None or host in type(methods.create(k)).learners]
needs_omniglot = pytest.mark.skipif(default_root("omniglot") is None, reason="shared omniglot data not found")


def test_allowed_values_match_the_registries():
    assert config.LEARNERS == tuple(learners.available())
    assert config.NO_INNER_LOOP == tuple(k for k in config.LEARNERS if not learners.learner_class(k).inner_loop)
    assert config.WRAPPERS == tuple(models.wrappers())
    assert config.ADAPT == tuple(functional.ADAPTED_ROLES)


def test_list_shows_learners_with_their_plugins_and_the_tnet_wrapper(capsys):
    assert cli.main(["list", "learners"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["maml (plug-ins: cml, cxgrad, meta_gna, trlearner)", "protonet (plug-ins: cml, trlearner)"]
    assert cli.main(["list", "models"]) == 0
    assert "tnet (wrapper: model.wrap)" in capsys.readouterr().out


def test_protonet_is_scored_after_zero_steps_and_refuses_inner_steps():
    cfg = config.resolve("protonet-omniglot-5w1s-cpu", [])
    assert (cfg.learner, cfg.test_steps, cfg.train_steps, cfg.eval_steps("classification")) == ("protonet", 0, 0, [0])
    with pytest.raises(config.ConfigError, match="no inner loop"):
        config.resolve("protonet-omniglot-5w1s-cpu", ["eval.inner_steps=1"])
    with pytest.raises(config.ConfigError, match="unknown wrapper 'tnt'"):
        config.resolve("omniglot-5w1s-cpu", ["model.wrap=tnt"])


@pytest.mark.data
@needs_omniglot
@pytest.mark.parametrize("preset, plugin", RUNS, ids=[f"{p.split('-omniglot')[0]}+{k}" for p, k in RUNS])
def test_every_host_runs_alone_and_with_each_supported_plugin(preset, plugin, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", preset, "--out-dir", str(out), "--no-progress", "--set", *SMALL,
            *([f"plugins={plugin}"] if plugin else [])]
    if (preset, plugin) in REFUSED:
        assert cli.main(args) == 2 and "adapts none" in capsys.readouterr().err
        return
    assert cli.main(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["iteration"] for rec in lines] == [1, 2]
    records = json.loads((out / "eval.json").read_text())
    steps = 0 if HOSTS[preset] == "protonet" else 3
    assert [(r["tasks"], r["inner_steps"]) for r in records] == [(4, steps)]


@pytest.mark.data
@needs_omniglot
@pytest.mark.parametrize("plugin", ["meta_gna", "cxgrad"])
def test_protonet_refuses_an_inner_loop_plugin_in_one_line(plugin, tmp_path, capsys):
    args = ["train", "--config", "protonet-omniglot-5w1s-cpu", "--out-dir", str(tmp_path / "run"), "--set", *SMALL,
            f"plugins={plugin}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not run on protonet" in err and "no inner loop" in err
    assert not (tmp_path / "run").exists()


def test_protonet_refuses_regression(tmp_path, capsys):
    args = ["train", "--config", "sinusoid-10shot", "--out-dir", str(tmp_path / "run"), "--set", "learner=protonet",
            "eval.inner_steps=none",
            "train.iterations=1"]
    assert cli.main(args) == 2 and "learner=protonet classifies" in capsys.readouterr().err


@pytest.mark.data
@needs_omniglot
def test_protonet_run_is_evaluated_at_other_ways_from_its_prototypes(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "protonet-omniglot-5w1s-cpu", "--out-dir", str(out), "--no-progress",
                     "--set", *SMALL]) == 0
    assert cli.main(["eval", str(out), "--ways", "10", "--tasks", "4"]) == 0
    last = json.loads((out / "eval.json").read_text())[-1]
    assert (last["ways"], last["trained_ways"], last["head"], last["inner_steps"]) == (10, 5, "prototype", 0)
    assert cli.main(["eval", str(out), "--steps", "1", "--tasks", "4"]) == 2
    assert "no inner loop" in capsys.readouterr().err


@pytest.mark.data
@needs_omniglot
def test_snell_protocol_trains_at_many_ways_and_tests_at_five(tmp_path):
    out = tmp_path / "run"
    small = [s for s in SMALL if not s.startswith("train.meta_batch_size")]
    assert cli.main(["train", "--config", "protonet-omniglot-5w1s-snell", "--out-dir", str(out), "--no-progress",
                     "--set", *small, "benchmark.ways=12"]) == 0
    records = json.loads((out / "eval.json").read_text())
    assert [(r["ways"], r["trained_ways"], r["inner_steps"], r["tasks"]) for r in records] == [(5, 12, 0, 4)]

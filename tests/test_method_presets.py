"""Every method preset runs end to end (tiny budget) through the command line and logs its diagnostics."""

from __future__ import annotations

import json

import pytest

from metagrad import cli, config
from metagrad.data.images import default_root

DIAGNOSTIC = {"meta_gna": "meta_gna.factor.step0/", "cxgrad": "cxgrad.gamma.step0/",
              "trlearner": "trlearner.relation", "cml": "cml.loss"}
METHOD_PRESETS = [p for p in config.presets() if config.resolve(p, []).plugins]
# Images of these benchmarks are brought by the user; their presets are checked to resolve only.
USER_DATA = ("mini_imagenet", "tiered_imagenet", "cub", "cifar_fs", "fc100")
# Shipped data, found through the library's own lookup (../shared/data or $METAGRAD_DATA); skipped without it.
SHIPPED_DATA = {"omniglot": "omniglot", "cora": "planetoid", "citeseer": "planetoid"}


def test_every_method_has_presets():
    methods = {m for p in METHOD_PRESETS for m in config.resolve(p, []).plugins}
    assert methods == set(DIAGNOSTIC)


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.data)
                                    if config.resolve(p, []).benchmark.name in SHIPPED_DATA else p
                                    for p in METHOD_PRESETS])
def test_method_preset_runs_and_logs_diagnostics(preset, tmp_path):
    cfg = config.resolve(preset, [])
    if cfg.benchmark.name in USER_DATA:
        pytest.skip(f"{cfg.benchmark.name} images are brought by the user")
    folder = SHIPPED_DATA.get(cfg.benchmark.name)
    if folder and default_root(folder) is None:
        pytest.skip(f"shared {folder} data not found (set METAGRAD_DATA)")
    small = ["train.iterations=2", "train.log_every=1", "train.val_every=0", "eval.tasks=4",
             "train.meta_batch_size=4", "model.width=8", "train.threads=1"]
    out = tmp_path / "run"
    assert cli.main(["train", "--config", preset, "--out-dir", str(out), "--no-progress", "--set", *small]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["iteration"] for rec in lines] == [1, 2]
    for method in cfg.plugins:
        assert any(k.startswith(DIAGNOSTIC[method]) for k in lines[-1]), (method, sorted(lines[-1]))
    records = json.loads((out / "eval.json").read_text())
    assert records and all(r["tasks"] == 4 for r in records)

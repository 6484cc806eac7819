"""A preregistered family: read from the preregistration file, tested one-sided on exactly its seeds against the
matched MAML, Holm over exactly its hypotheses; bad files stop with one line naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from metagrad import config as C
from metagrad.family import family_table, read_family
from metagrad.report import confirm
from metagrad.stats import holm
from tests.test_report import fake_row

ROOT = Path(__file__).resolve().parents[1]

FAMILY = """# metagrad family: test
level = 0.05
alternative = "greater"
config = {{ "eval.seed" = 1 }}
[[hypothesis]]
id = "A"
method = "cml"
preset = "p"
benchmark = "b"
steps = 1
seeds = {seeds}
[[hypothesis]]
id = "B"
method = "meta_gna"
preset = "p"
benchmark = "b"
steps = 1
seeds = [3, 4, 5]
"""


def family_file(tmp_path, seeds="[3, 4, 5]"):
    path = tmp_path / "prereg.md"
    path.write_text("# Prereg\n\nprose\n\n```toml\n" + FAMILY.format(seeds=seeds) + "```\n", encoding="utf-8")
    return path


def rows(seeds, eval_seed=1):
    rng = np.random.default_rng(0)
    task = 0.9 + 0.05 * rng.standard_normal(50)
    offsets = {s: 0.003 * rng.standard_normal() for s in seeds}
    maml = np.array([task + offsets[s] for s in seeds])
    gain = np.array([[0.010], [0.012], [0.011], [0.009], [0.013], [0.010]])[:len(seeds)]
    out = [fake_row("maml", maml, seeds=seeds), fake_row("cml", maml + gain, seeds=seeds),
           fake_row("meta_gna", maml - gain, seeds=seeds)]
    for row in out:
        for run in row.runs:
            run.cfg.eval.seed = eval_seed
    return out, maml, gain


def test_the_preregistration_file_parses():
    fam = read_family(ROOT / "docs" / "preregistration.md")
    assert [h.id for h in fam.hypotheses] == [f"H{i}" for i in range(1, 9)]
    assert fam.alternative == "greater" and fam.config == {"eval.seed": 1} and fam.level == 0.05
    assert fam.hypotheses[1].benchmark == "mnist" and fam.hypotheses[2].seeds == (3, 4, 5, 6, 7, 8)


def test_one_sided_paired_tests_on_exactly_the_listed_seeds(tmp_path):
    fam = read_family(family_file(tmp_path))
    made, _, gain = rows([0, 1, 2, 3, 4, 5])          # seeds 0-2 are exploratory: never in the family
    res = confirm(fam, [run for row in made for run in row.runs])
    a, b = res
    assert a.seeds == [3, 4, 5] and a.complete and b.seeds == [3, 4, 5]
    d = gain[3:, 0]
    ref = sps.ttest_1samp(d, 0.0, alternative="greater").pvalue
    assert a.comparison.p == pytest.approx(ref, rel=1e-9) and a.comparison.diff == pytest.approx(d.mean())
    assert b.comparison.p == pytest.approx(sps.ttest_1samp(-d, 0.0, alternative="greater").pvalue, rel=1e-9)
    assert [r.adjusted for r in res] == pytest.approx(holm([a.comparison.p, b.comparison.p]))
    assert a.verdict(fam.level) == "confirmed" and b.verdict(fam.level) == "not confirmed"
    title, _, cells = family_table(fam, res)
    assert "2 hypotheses" in title and cells[0][0] == "A" and cells[0][-1] == "confirmed"
    assert cells[0][4] == "3, 4, 5 of 3, 4, 5"


def test_runs_outside_the_files_config_and_missing_seeds(tmp_path):
    fam = read_family(family_file(tmp_path, seeds="[3, 4, 5, 6]"))
    made, *_ = rows([3, 4, 5], eval_seed=0)                # scored on other test tasks: not this test's runs
    res = confirm(fam, [run for row in made for run in row.runs])
    assert all(r.comparison is None for r in res) and res[0].verdict(0.05).startswith("no result")
    made, *_ = rows([3, 4, 5])
    res = confirm(fam, [run for row in made for run in row.runs])
    assert res[0].verdict(0.05) == "in progress (3 of 4 seeds)"
    # a hypothesis without a p counts as p = 1: the family keeps its size
    only_a = confirm(fam, [run for row in made[:2] for run in row.runs])
    assert only_a[0].adjusted == pytest.approx(min(1.0, 2 * only_a[0].comparison.p))


@pytest.mark.parametrize("text, message", [
    ("no block here", "expected one ```toml block"),
    ("```toml\n# metagrad family\nlevel = 2.0\n[[hypothesis]]\nid='x'\n```\n", "level must be"),
    ("```toml\n# metagrad family\n[[hypothesis]]\nid = 'x'\n```\n", "missing method"),
    ("```toml\n# metagrad family\nalternative = 'up'\n[[hypothesis]]\nid='x'\n```\n", "alternative must be"),
    (("```toml\n# metagrad family\n[[hypothesis]]\nid='x'\nmethod='m'\npreset='p'\nbenchmark='b'\nsteps=1\n"
      "seeds=['3']\n```\n"), "seeds"),
    ("```toml\n# metagrad family\nx = [\n```\n", "not valid TOML"),
])
def test_a_bad_family_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "f.md"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(C.ConfigError, match=message) as e:
        read_family(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)

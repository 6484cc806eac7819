"""A pre-registered family of hypotheses, read from a file and tested on the runs a report is given.

A confirmatory test names its hypotheses before any run (docs/preregistration.md): for each, the method, the
preset it trains, the benchmark view and the inner-step count it is scored at, and the fresh seeds; for the whole
family, the level, the correction and the one-sided alternative. The file is Markdown with one fenced ``toml``
block whose first line is ``# metagrad family``, or a TOML file of that block alone:

    level = 0.05
    correction = "holm"
    alternative = "greater"                # each hypothesis: method > matched MAML
    config = { "eval.seed" = 1 }           # only runs with these resolved config values count
    [[hypothesis]]
    id = "H1"
    method = "cxgrad"
    preset = "omniglot-5w1s-a001x5-plateau"
    benchmark = "omniglot"
    steps = 5
    seeds = [3, 4, 5, 6, 7]

Each hypothesis is the paired test of :func:`metagrad.stats.compare` on the per-seed mean differences between the
method's runs and its matched MAML's (the same resolved config without the plug-ins) at the listed seeds, with the
family's alternative; Holm's correction runs over exactly the file's hypotheses (one still without a p counts as
p = 1, so the family never shrinks). Nothing outside the file is confirmatory.

Example:
    >>> fam = read_family("docs/preregistration.md")
    >>> for r in confirm(fam, runs): print(r.hypothesis.id, r.verdict)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from . import config as C
from . import reading, stats

MARK = "# metagrad family"
_KEYS = {"id": str, "method": str, "preset": str, "benchmark": str, "steps": int, "seeds": list}


@dataclass(frozen=True)
class Hypothesis:
    id: str
    method: str            # the plug-in label of the runs (metagrad.rundir.method_label), e.g. "cxgrad"
    preset: str
    benchmark: str         # the evaluated benchmark: the preset's own or a cross-domain view
    steps: int             # inner steps at scoring
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Family:
    path: str
    hypotheses: tuple[Hypothesis, ...]
    level: float = 0.05
    correction: str = "holm"
    alternative: str = "greater"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    hypothesis: Hypothesis
    seeds: list[int]                           # seeds present for both the method and its MAML
    comparison: stats.Comparison | None
    adjusted: float
    method_mean: float = math.nan
    maml_mean: float = math.nan
    reason: str = ""                           # why there is no comparison
    metric: str = "accuracy"

    @property
    def complete(self) -> bool:
        return sorted(self.seeds) == sorted(self.hypothesis.seeds)

    def verdict(self, level: float) -> str:
        if self.comparison is None:
            return f"no result ({self.reason})"
        if not self.complete:
            return f"in progress ({len(self.seeds)} of {len(self.hypothesis.seeds)} seeds)"
        return "confirmed" if self.adjusted < level else "not confirmed"


def _error(path: str | Path, what: str) -> C.ConfigError:
    return C.ConfigError(f"{path}: {what} (see docs/preregistration.md for the format)")


def read_family(path: str | Path) -> Family:
    """The family of a preregistration file (Markdown with a ``# metagrad family`` toml block, or TOML)."""
    p = Path(path)
    try:
        text = reading.read_text(p, fix="give the preregistration file")   # no FIFO waited on; UTF-8 or one line
    except OSError as e:
        raise C.ConfigError(f"{p}: cannot read the family file ({e.strerror or e})") from None
    if p.suffix.lower() != ".toml":
        blocks = [b for b in re.findall(r"^```toml\n(.*?)^```", text, re.DOTALL | re.MULTILINE) if b.lstrip().startswith(MARK)]
        if len(blocks) != 1:
            raise _error(p, f"expected one ```toml block starting with '{MARK}', found {len(blocks)}")
        text = blocks[0]
    try:
        raw = reading.check_value(p, tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise _error(p, f"not valid TOML ({e})") from None
    unknown = set(raw) - {"level", "correction", "alternative", "config", "hypothesis"}
    if unknown:
        raise _error(p, f"unknown keys {', '.join(sorted(unknown))}")
    level, correction = raw.get("level", 0.05), raw.get("correction", "holm")
    alternative, cfg = raw.get("alternative", "greater"), raw.get("config", {})
    if not isinstance(level, float) or not 0 < level < 1:
        raise _error(p, f"level must be a number in (0, 1), got {level!r}")
    if correction != "holm":
        raise _error(p, f"correction must be 'holm', got {correction!r}")
    if alternative not in stats.ALTERNATIVES:
        raise _error(p, f"alternative must be one of {', '.join(stats.ALTERNATIVES)}, got {alternative!r}")
    if not isinstance(cfg, dict):
        raise _error(p, "config must be a table of resolved config keys and values")
    items = raw.get("hypothesis", [])
    if not isinstance(items, list) or not items:
        raise _error(p, "no [[hypothesis]] entries")
    hyps: list[Hypothesis] = []
    for n, h in enumerate(items, 1):
        missing = [k for k in _KEYS if k not in h]
        extra = sorted(set(h) - set(_KEYS))
        if missing or extra:
            raise _error(p, f"hypothesis {n}: " + (f"missing {', '.join(missing)}" if missing
                                                    else f"unknown keys {', '.join(extra)}"))
        bad = [k for k, t in _KEYS.items() if not isinstance(h[k], t) or isinstance(h[k], bool)]
        if bad or not h["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                             for s in h["seeds"]):
            raise _error(p, f"hypothesis {n}: {', '.join(bad) or 'seeds'} of the wrong type (seeds: a list of "
                            "seeds >= 0)")
        hyps.append(Hypothesis(h["id"], h["method"], h["preset"], h["benchmark"], h["steps"], tuple(h["seeds"])))
    ids = [h.id for h in hyps]
    if len(set(ids)) != len(ids):
        raise _error(p, "hypothesis ids must be unique")
    return Family(str(p), tuple(hyps), level, correction, alternative, dict(cfg))


def family_table(fam: Family, results: Sequence[Result]) -> tuple[str, list[str], list[list[str]]]:
    """The confirmatory table: (title, header, cells)."""
    side = {"greater": "method > MAML", "less": "method < MAML", "two-sided": "two-sided"}[fam.alternative]
    head = ["id", "method", "benchmark", "steps", "seeds", "method", "matched MAML", "difference [95% CI]",
            f"p ({side})", "Holm p", "verdict"]
    cells = []
    for r in results:
        h, c = r.hypothesis, r.comparison
        view = h.preset if h.benchmark in h.preset else f"{h.preset} → {h.benchmark}"
        seeds = f"{', '.join(map(str, r.seeds)) or '–'} of {', '.join(map(str, h.seeds))}"
        if c is None:
            cells.append([h.id, h.method, view, str(h.steps), seeds, "–", "–", "–", "–", "–", r.verdict(fam.level)])
            continue
        scale, unit, d = (100, "%", 2) if r.metric == "accuracy" else (1, "", 4)
        ci = "" if math.isnan(c.low) else f" [{scale * c.low:+.{d}f}, {scale * c.high:+.{d}f}]"
        p = "–" if math.isnan(c.p) else f"{c.p:.3g}"
        cells.append([h.id, h.method, view, str(h.steps), seeds, f"{scale * r.method_mean:.{d}f}{unit}",
                      f"{scale * r.maml_mean:.{d}f}{unit}", f"{scale * c.diff:+.{d}f}{ci}", p, f"{r.adjusted:.3g}",
                      r.verdict(fam.level)])
    title = (f"Confirmatory family ({fam.path}: {len(results)} hypotheses, one-sided paired t on per-seed means, "
             f"{fam.correction.capitalize()} at {fam.level}; only the seeds it lists)")
    return title, head, cells


__all__ = ["Family", "Hypothesis", "Result", "family_table", "read_family"]

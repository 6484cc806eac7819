"""A method's knowledge lives in its plug-in (``src/metagrad/methods/``): the rest of the package names no method.

Plug-ins declare what the rest asks: ``Plugin.task_group_size`` (distributed sharding keeps groups whole) and
``Plugin.figures`` (the report draws them from the specs). The scan below walks every module of
``src/metagrad`` outside ``methods/`` and fails on a method's registry key or class name in code: identifiers,
imports and string literals. Docstrings and comments may cite the papers.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

from metagrad import MAML, methods
from metagrad import distributed as D
from metagrad.seams import FigureSpec, LayerFigure, MatrixFigure, Plugin, VersusFigure
from metagrad.tasks import task_groups
from tests.helpers import conv64, image_batch, mlp64

SRC = Path(methods.__file__).resolve().parents[1]

# What may still name a method outside methods/, by (file relative to src/metagrad, the code fragment): why.
# Every entry must still be found (a stale entry fails), so the list shrinks as the code does.
ALLOWED: dict[tuple[str, str], str] = {
    # Prose in a core figure's title: the per-sample loss spread and the per-layer gradient norms are measured
    # for every row (no plug-in involved); the title says which paper argues with them. No behaviour.
    ("report_plots.py", ": per-sample query-loss distribution (Meta-GNA's argument)"): "paper citation",
    ("report_plots.py", (": per-layer inner-gradient norms, last 10% of training, mean over seeds "
                         "(CxGrad's argument)")): "paper citation",
}
# By design, and not scanned: the registry and the plug-ins (methods/), and the presets and studies
# (configs/*.toml), which pick plug-ins by registry key. A plug-in that reads an intermediate activation picks the
# module at attach and asks ``functional.forward_batched(..., tap=name)``, a generic hook: the models offer nothing
# made for it (tests/test_models.py: Conv4 is the module of the spec).


def _method_names() -> set[str]:
    """Registry keys and plug-in class names, lower case without separators: meta_gna → metagna."""
    names = set()
    for key in methods.available():
        names.add(re.sub(r"[^a-z0-9]", "", key.lower()))
        names.add(type(methods.create(key)).__name__.lower())
    return names


def _tokens(text: str) -> set[str]:
    """Words of ``text`` (split at separators and camel case) and adjacent pairs joined: 'Meta-GNA' → metagna."""
    out: set[str] = set()
    for words in (re.findall(r"[a-z0-9]+", text.lower()),
                  [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", text)]):
        out.update(words)
        out.update(a + b for a, b in itertools.pairwise(words))
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _code_fragments(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every identifier, imported name and non-docstring string literal."""
    docs = _docstrings(tree)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name):
            out.append((line, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((line, node.attr))
        elif isinstance(node, ast.alias):
            out += [(line, node.name), (line, node.asname or "")]
        elif isinstance(node, ast.ImportFrom):
            out.append((line, node.module or ""))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((line, node.name))
        elif isinstance(node, ast.arg):
            out.append((line, node.arg))
        elif isinstance(node, ast.keyword):
            out.append((line, node.arg or ""))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append((line, node.value))
    return out


def test_no_module_outside_methods_names_a_method():
    names = _method_names()
    assert {"metagna", "cxgrad", "trlearner", "cml"} <= names
    found, allowed = [], set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "methods":
            continue
        for line, text in _code_fragments(ast.parse(path.read_text(), str(path))):
            if _tokens(text) & names:
                if (rel.as_posix(), text) in ALLOWED:
                    allowed.add((rel.as_posix(), text))
                else:
                    found.append(f"{rel}:{line}: {text[:80]!r}")
    assert not found, "method knowledge outside methods/ (declare it on the plug-in instead):\n" + "\n".join(found)
    assert allowed == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - allowed}"


def test_the_scan_sees_names_in_code_not_in_docstrings():
    names = _method_names()
    code = ('"""CxGrad and TRLearner in a docstring."""\n'
            "from .methods.trlearner import task_groups  # a TRLearner comment\n"
            "x = m['cml.loss']\nplot_meta_gna = 1\ny = 'MetaGNA'\nz = 'metagrad icml html'\n")
    hits = {text for _, text in _code_fragments(ast.parse(code)) if _tokens(text) & names}
    assert hits == {"methods.trlearner", "cml.loss", "plot_meta_gna", "MetaGNA"}


# ------------------------------------------------------------------------------------------------ declarations
class Pairs(Plugin):
    @property
    def task_group_size(self) -> int:
        return 2


def test_task_grouping_is_asked_of_the_plugins():
    assert Plugin().task_group_size == 1
    assert methods.create("trlearner", group_size=3).task_group_size == 3
    assert D.group_size_of(MAML(mlp64(), inner_lr=0.1, loss="mse")) is None
    assert D.group_size_of(MAML(mlp64(), inner_lr=0.1, loss="mse", plugins=[methods.create("meta_gna")])) is None
    assert D.group_size_of(MAML(mlp64(), inner_lr=0.1, loss="mse", plugins=[Pairs()])) == 2
    both = MAML(mlp64(), inner_lr=0.1, loss="mse", plugins=[Pairs(), methods.create("trlearner", group_size=2)])
    assert D.group_size_of(both) == 2
    with pytest.raises(ValueError, match="different sizes"):
        D.group_size_of(MAML(mlp64(), inner_lr=0.1, loss="mse",
                             plugins=[Pairs(), methods.create("trlearner", group_size=3)]))
    assert D.units(5, 2) == task_groups(5, 2) == [range(2), range(2, 5)]
    assert D.units(3, 1) == D.units(3) == [range(1), range(1, 2), range(2, 3)]


def _figure_keys(spec: FigureSpec) -> list[str]:
    if isinstance(spec, (LayerFigure, MatrixFigure)):
        return [spec.series.key]
    assert isinstance(spec, VersusFigure)
    return [spec.loss.key, spec.accuracy.key]


@pytest.mark.parametrize("key", methods.available())
def test_declared_figures_plot_what_the_plugin_logs(key):
    """Each figure's series are diagnostics this plug-in logs (classification: CML logs its accuracy too), in its
    own namespace, to a file of its own."""
    cls = type(methods.create(key))
    learner = MAML(conv64(), inner_lr=0.4, inner_steps=1, plugins=[cls()]).double()
    logged = learner.meta_loss(image_batch(T=4)).diagnostics
    for spec in cls.figures:
        for k in _figure_keys(spec):
            assert k.startswith(f"{key}."), f"{key}: diagnostic {k!r} outside its namespace"
            assert k in logged, f"{key} declares a figure of {k!r} but logs only {sorted(logged)}"
    files = [spec.file for spec in methods.figures()]
    assert len(files) == len(set(files))
    assert {"meta-gna", "cxgrad", "relation", "cml"} <= set(files)

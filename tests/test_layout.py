"""The package's import graph (read with ``ast``, nothing imported): no import circles between
modules, and no import from a lower layer to a higher one (docs/DESIGN.md, "Layout").

Layers, bottom to top: the top package ``icl_cli`` (its version only), ``core`` and ``store`` ←
``dictionaries`` ← the steps (``collect``, ``clean``, ``steer``, ``ablate``, ``circuit``,
``train_sae``, ``zoo``) ← ``report`` ← ``cli`` (and ``__main__``). A module may import its own
layer or any lower one; steps may import each other (clean reads collect's artifacts) as long as
no circle forms. Every import counts: at the top of a module, inside a function (the lazy imports
that keep ``icl --help`` fast) and under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "icl_cli"

LAYERS = {"": 0, "core": 0, "store": 0, "dictionaries": 1,
          "collect": 2, "clean": 2, "steer": 2, "ablate": 2, "circuit": 2, "train_sae": 2, "zoo": 2,
          "report": 3, "cli": 4, "__main__": 4}
"""Layer of each top-level package (or module) of icl_cli; "" is the top package itself."""


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (a package is its __init__.py)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _owner(name: str, mods: dict) -> str | None:
    """The module that defines ``name``: itself, or its nearest enclosing package."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body). ``from a.b import c``
    is an import of module ``a.b.c`` when that is a module, else of ``a.b``."""
    graph = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found |= {_owner(a.name, mods) for a in node.names if a.name.split(".")[0] == "icl_cli"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                if base.split(".")[0] != "icl_cli":
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.add(sub if sub in mods else _owner(base, mods))
        found.discard(None)
        found.discard(mod)
        graph[mod] = found
    return graph


def layer(mod: str) -> int:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top not in LAYERS:
        raise AssertionError(f"{mod}: package {top!r} has no layer; add it to LAYERS (and to docs/DESIGN.md)")
    return LAYERS[top]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {t}" for m in sorted(graph) for t in sorted(graph[m]) if layer(t) > layer(m)]


# ---- the checker itself, on a planted package ----------------------------------------------------
def _plant(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    root = tmp_path / "icl_cli"
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return imports(modules(root))


def test_checker_finds_planted_circles_and_upward_imports(tmp_path):
    graph = _plant(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "def f():\n    from icl_cli.core import b\n",            # lazy import
        "core/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from icl_cli.core.a import f\n",
        "core/c.py": "from . import a\nfrom .a import f\n",                      # relative imports
        "store/__init__.py": "from icl_cli.store.s import S\n",
        "store/s.py": "import icl_cli.cli.x\nS = 1\n",                          # upward
        "cli/__init__.py": "",
        "cli/x.py": "from icl_cli.store import S\nimport os\n",
    })
    assert graph["icl_cli.core.a"] == {"icl_cli.core.b"}
    assert graph["icl_cli.core.b"] == {"icl_cli.core.a"}
    assert graph["icl_cli.core.c"] == {"icl_cli.core.a"}
    assert graph["icl_cli.cli.x"] == {"icl_cli.store"}  # a name from a package's __init__
    assert sorted(circles(graph)) == [["icl_cli.cli.x", "icl_cli.store", "icl_cli.store.s"],
                                      ["icl_cli.core.a", "icl_cli.core.b"]]
    assert upward(graph) == ["icl_cli.store.s -> icl_cli.cli.x"]


def test_checker_accepts_a_clean_graph(tmp_path):
    graph = _plant(tmp_path, {
        "__init__.py": "__version__ = '0'\n",
        "core/__init__.py": "",
        "core/a.py": "from icl_cli import __version__\n",
        "clean/__init__.py": "",
        "clean/step.py": "from icl_cli.core.a import x\nfrom icl_cli.collect import artifact\n",
        "collect/__init__.py": "",
        "collect/artifact.py": "from icl_cli.core import a\n",
        "cli/__init__.py": "",
        "cli/clean_cmd.py": "def f():\n    from icl_cli.clean.step import run\n",
    })
    assert circles(graph) == [] and upward(graph) == []


# ---- the package ---------------------------------------------------------------------------------
GRAPH = imports(modules())


def test_every_package_has_a_layer():
    for mod in GRAPH:
        layer(mod)


def test_no_upward_import():
    assert upward(GRAPH) == []


def test_no_import_circle():
    assert circles(GRAPH) == []

"""Import boundaries: the layers of docs/architecture.md, no cycles, pure cores without I/O.

The layers are stated once, as the picture in the "Layers" section of
``docs/architecture.md``; this test reads it from there. Each line of the
picture is one layer, the top line the highest; packages on one line, split
by ``|``, are siblings. Invariants checked on every ``import`` and ``from ...
import`` of every module under ``wal/``, ``engine/`` and ``tools/``
(relative imports resolved to absolute modules, imports inside functions
included, ``__import__("x")`` and ``importlib.import_module("x")`` too):

* every module belongs to exactly one layer, except a package that spans
  layers (``engine``), whose ``__init__`` imports nothing of ours;
* no module imports a layer above its own, nor a sibling on its line;
* ``wal`` imports nothing of ours but itself, only the standard library,
  blake3 and cbor2, and never anyio;
* nothing outside ``tools`` imports ``tools``;
* the resolved module graph has no cycle;
* every import of ours names a module that exists;
* the sans-I/O modules (``PURE``) import no I/O module; a listed file that is
  missing fails.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass

import pytest
from tests.support import ROOT

ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")
PACKAGES = ("wal", "engine", "tools")

#: What ``wal`` may import besides the standard library and itself.
WAL_THIRD_PARTY = {"blake3", "cbor2"}

#: The sans-I/O modules: bytes, events or records in; bytes, events, replies or plans out.
PURE = [
    "engine/replication/messages.py",
    "engine/replication/transitions.py",
    "engine/replication/codec.py",
    "engine/replication/auth.py",
    "engine/replication/session.py",
    "engine/replication/decisions.py",
    "engine/store/decisions.py",
    "engine/store/structure.py",
    "engine/store/imap_values.py",
    "engine/reconcile/replay.py",
    "engine/reconcile/tail_diff.py",
    "engine/reconcile/planner.py",
    "engine/lmtp/session.py",
    # engine/imap/: everything but server.py and node_backend.py (IMAP-27, tests/imap/test_imap_spec.py)
    "engine/imap/__init__.py",
    "engine/imap/backend.py",
    "engine/imap/commands.py",
    "engine/imap/executor.py",
    "engine/imap/memory.py",
    "engine/imap/names.py",
    "engine/imap/parser.py",
    "engine/imap/responses.py",
    "engine/imap/search.py",
    "engine/imap/session.py",
    "engine/imap/view.py",
]
#: Modules a pure module must not import (a submodule of one counts: ``os.path`` is ``os``).
IMPURE = {"anyio", "asyncio", "socket", "ssl", "selectors", "subprocess", "os", "time", "threading",
          "sqlite3", "sqlite_utils", "wal.writer"}


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to an absolute module name.

    ``target`` is the most specific module named: ``from engine.store import
    events`` targets ``engine.store.events`` when that is a module, and
    ``engine.store`` when ``events`` is a name defined there.
    """

    path: str  # relative to the root
    line: int
    statement: str
    source: str  # the importing module
    target: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.statement}"


def find_modules(root: str) -> dict[str, tuple[str, bool]]:
    """Every module of ``PACKAGES`` under ``root``: dotted name -> (path relative to root, is a package)."""
    modules = {}
    for top in PACKAGES:
        for dirpath, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                dotted = rel[:-3].replace(os.sep, ".")
                is_package = dotted.endswith(".__init__")
                modules[dotted.removesuffix(".__init__")] = (rel, is_package)
    return modules


def _dynamic_target(node: ast.Call) -> str | None:
    """The module of ``__import__("x")`` or ``importlib.import_module("x")`` with a literal name."""
    func = node.func
    named = (isinstance(func, ast.Name) and func.id == "__import__") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module")
    if named and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports_of(root: str, module: str, modules: dict[str, tuple[str, bool]]) -> list[Import]:
    """Every import in ``module``, wherever it stands in the file, with relative names resolved."""
    rel, is_package = modules[module]
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        tree = ast.parse(f.read(), rel)
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def add(node: ast.AST, target: str) -> None:
        imp = Import(rel, node.lineno, ast.unparse(node), module, target)
        if imp not in found:  # ``from m import a, b`` targets ``m`` once
            found.append(imp)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    add(node, "." * node.level + (node.module or ""))  # beyond the top: reported as unknown
                    continue
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(node, submodule if submodule in modules else base)
        elif isinstance(node, ast.Call) and (target := _dynamic_target(node)):
            add(node, target)
    return found


def is_ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES or name.startswith(".")


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def read_layers(text: str) -> list[list[str]]:
    """The layer picture of the "Layers" section, bottom layer first; each layer is a list of dotted prefixes.

    A line of the picture is ``path | path ...`` then two or more spaces and a
    description; ``engine/store/`` is ``engine.store``, ``engine/runner.py``
    is ``engine.runner``.
    """
    section = re.search(r"^## Layers\n(.*?)^## ", text, re.DOTALL | re.MULTILINE)
    assert section, "docs/architecture.md has no '## Layers' section"
    picture = re.search(r"^```\n(.*?)^```", section.group(1), re.DOTALL | re.MULTILINE)
    assert picture, "the 'Layers' section of docs/architecture.md has no picture (a ``` block)"
    layers = []
    for line in picture.group(1).splitlines():
        if not line.strip():
            continue
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        layer = []
        for path in (p.strip() for p in names.split("|")):
            assert re.fullmatch(r"(wal|engine|tools)(/\w+)*(/|\.py)?", path), f"not a package path: {path!r} in {line!r}"
            layer.append(path.removesuffix("/").removesuffix(".py").replace("/", "."))
        layers.append(layer)
    return layers[::-1]


def layer_of(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(rank, package) of the layer entry ``module`` belongs to: the longest prefix that contains it."""
    best = None
    for rank, layer in enumerate(layers):
        for entry in layer:
            if within(module, entry) and (best is None or len(entry) > len(best[1])):
                best = (rank, entry)
    return best


def coverage_problems(modules, layers) -> list[str]:
    """Modules in no layer (other than a package that spans layers) and layer entries naming no module."""
    entries = [entry for layer in layers for entry in layer]
    problems = [f"{entry}: in the layer picture, but no such module or package"
                for entry in entries if entry not in modules]
    problems += [f"{entry}: on two lines of the layer picture" for entry in set(entries) if entries.count(entry) > 1]
    for module, (rel, _) in sorted(modules.items()):
        if layer_of(module, layers) is None and not any(within(e, module) for e in entries):
            problems.append(f"{rel}: belongs to no layer of the picture in docs/architecture.md")
    return problems


def layer_violations(imports: list[Import], modules, layers) -> list[str]:
    """Each import of a higher layer, of a sibling, or by a spanning package's ``__init__``."""
    bad = []
    for imp in imports:
        if not is_ours(imp.target) or imp.target not in modules:
            continue
        src, dst = layer_of(imp.source, layers), layer_of(imp.target, layers)
        if src is None:
            bad.append(f"{imp}  ({imp.source} spans layers: its __init__ imports nothing of ours)")
        elif dst is None:
            bad.append(f"{imp}  ({imp.target} spans layers: import the module itself)")
        elif dst[0] > src[0]:
            bad.append(f"{imp}  ({src[1]} imports {dst[1]}, a layer above it)")
        elif dst[0] == src[0] and dst[1] != src[1]:
            bad.append(f"{imp}  ({src[1]} imports its sibling {dst[1]})")
    return bad


def find_cycles(imports: list[Import], modules) -> list[list[Import]]:
    """One cycle of imports for each strongly connected part of the module graph.

    Edges are the resolved imports between our modules. Importing
    ``a.b.c`` also runs ``a/b/__init__.py``; that implicit edge is left out,
    since a package's ``__init__`` importing its own submodules is the normal
    shape and never a cycle at run time.
    """
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.source:
            graph[imp.source].setdefault(imp.target, imp)
    index, low, stack, on_stack, parts = {}, {}, [], set(), []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.add(w)
                if w == v:
                    break
            if len(part) > 1:
                parts.append(part)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for part in parts:  # a shortest path from one module back to itself, inside its part
        start = min(part)
        came_from = {start: None}
        queue, path = [start], None
        while queue and path is None:
            v = queue.pop(0)
            for w, imp in sorted(graph[v].items()):
                if w == start:
                    path = [imp]
                    while came_from[v] is not None:
                        path.append(came_from[v])
                        v = came_from[v].source
                    break
                if w in part and w not in came_from:
                    came_from[w] = imp
                    queue.append(w)
        cycles.append(path[::-1])
    return cycles


def impure_imports(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if any(within(imp.target, bad) for bad in IMPURE)]


def _module_of_path(path: str) -> str:
    return path[:-3].replace("/", ".").removesuffix(".__init__")


# -- the checks on this tree ---------------------------------------------------------------------------------

MODULES = find_modules(ROOT)
IMPORTS = [imp for module in MODULES for imp in imports_of(ROOT, module, MODULES)]


@pytest.fixture(scope="module")
def layers():
    with open(ARCHITECTURE, encoding="utf-8") as f:
        return read_layers(f.read())


def test_every_module_belongs_to_one_layer(layers):
    problems = coverage_problems(MODULES, layers)
    assert not problems, "\n".join(problems)


def test_no_module_imports_a_layer_above_or_a_sibling(layers):
    bad = layer_violations(IMPORTS, MODULES, layers)
    assert not bad, "imports against the layers of docs/architecture.md:\n" + "\n".join(bad)


def test_every_import_of_ours_names_a_module():
    bad = [str(imp) for imp in IMPORTS if is_ours(imp.target) and imp.target not in MODULES]
    assert not bad, "imports of modules that do not exist:\n" + "\n".join(bad)


def test_wal_imports_only_itself_the_standard_library_blake3_and_cbor2():
    allowed = set(sys.stdlib_module_names) | WAL_THIRD_PARTY | {"wal", "__future__"}
    bad = [str(imp) for imp in IMPORTS if within(imp.source, "wal") and imp.target.split(".")[0] not in allowed]
    assert not bad, "wal imports beyond the standard library, blake3 and cbor2:\n" + "\n".join(bad)


def test_wal_never_imports_anyio_or_engine_or_tools():
    bad = [str(imp) for imp in IMPORTS if within(imp.source, "wal")
           and any(within(imp.target, name) for name in ("anyio", "engine", "tools"))]
    assert not bad, "\n".join(bad)


def test_nothing_imports_tools():
    bad = [str(imp) for imp in IMPORTS if within(imp.target, "tools") and not within(imp.source, "tools")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    cycles = find_cycles(IMPORTS, MODULES)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(str(imp) for imp in cycle) for cycle in cycles)


@pytest.mark.parametrize("path", PURE)
def test_pure_modules_do_no_io(path):
    assert os.path.exists(os.path.join(ROOT, path)), f"{path} is listed as pure but does not exist"
    module = _module_of_path(path)
    bad = [str(imp) for imp in impure_imports(imports_of(ROOT, module, MODULES))]
    assert not bad, "\n".join(bad)


# -- the checks find what they look for ------------------------------------------------------------------------

PLANTED = {
    "docs/architecture.md": "## Layers\n\n```\n  tools/  top\n  engine/b/ | engine/c/  two\n"
                            "  engine/a.py  errors\n  wal/  log\n```\n\n## Next\n",
    "wal/__init__.py": "",
    "wal/log.py": "import anyio\n\ndef later():\n    from engine import a\n",
    "wal/jumps.py": "def f():\n    return __import__('anyio')\n",
    "engine/__init__.py": "from .b import thing\n",
    "engine/a.py": "def f():\n    from .b import thing\n",
    "engine/b/__init__.py": "from .inner import thing\n",
    "engine/b/inner.py": "from ..c import other\nfrom . import pure\nthing = 1\n",
    "engine/b/pure.py": "import os.path\nfrom wal import jumps\n",
    "engine/c/__init__.py": "from engine.c.loop import other\n",
    "engine/c/loop.py": "import engine.c.back\nother = 2\n",
    "engine/c/back.py": "from .loop import other\nimport engine.gone\n",
    "engine/stray.py": "",
    "tools/__init__.py": "import wal.log\n",
}


def test_the_checks_find_planted_violations(tmp_path):
    """A small tree with one of each violation: each check reports it at its file and line."""
    for rel, text in PLANTED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "engine" / "b" / "more.py").write_text("from tools import x\n")
    layers = read_layers((tmp_path / "docs" / "architecture.md").read_text())
    assert layers == [["wal"], ["engine.a"], ["engine.b", "engine.c"], ["tools"]]
    modules = find_modules(str(tmp_path))
    imports = [imp for module in modules for imp in imports_of(str(tmp_path), module, modules)]

    assert coverage_problems(modules, layers) == ["engine/stray.py: belongs to no layer of the picture in docs/architecture.md"]
    violations = layer_violations(imports, modules, layers)
    assert [v.split("  (")[0] for v in violations] == [
        "wal/log.py:4: from engine import a",
        "engine/__init__.py:1: from .b import thing",
        "engine/a.py:2: from .b import thing",
        "engine/b/inner.py:1: from ..c import other",
        "engine/b/more.py:1: from tools import x",
    ]
    assert "a layer above it" in violations[0] and "sibling engine.c" in violations[3]
    assert [str(imp) for imp in imports if within(imp.source, "wal") and within(imp.target, "anyio")] == [
        "wal/jumps.py:2: __import__('anyio')", "wal/log.py:1: import anyio"]
    assert [str(imp) for imp in imports if is_ours(imp.target) and imp.target not in modules] == [
        "engine/c/back.py:2: import engine.gone"]
    assert [[str(imp) for imp in cycle] for cycle in find_cycles(imports, modules)] == [
        ["engine/c/back.py:1: from .loop import other", "engine/c/loop.py:1: import engine.c.back"]]
    assert [str(imp) for imp in impure_imports(imports_of(str(tmp_path), "engine.b.pure", modules))] == [
        "engine/b/pure.py:1: import os.path"]

"""The layer rules of moecpt, checked on the source text (every module is parsed with `ast`, none is imported).

A module is one .py file under src/moecpt. Imports anywhere in a file count, function-local ones included;
`from moecpt.x import y` where y is a submodule counts as importing moecpt.x.y. Importing a module does not
count as importing its parent packages (Python runs their __init__ too, but that is not an edge we chose).

Layers, bottom to top (a module may import its own layer and the ones below, never one above):

    errors, config < kernels < model, data < parallel < train < tools < eval < pipeline, report < cli

`moecpt/cli.py`, every `__main__.py` and every package's `cli.py` (where commands are registered) are the cli
layer: they may import anything. `moecpt/__init__.py` re-exports and is exempt.

Each failure message lists the offending modules and lines, so that it reads as a to-do list.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "moecpt"
LAYERS: list[tuple[str, ...]] = [
    ("errors", "config"),
    ("kernels",),
    ("model", "data"),
    ("parallel",),
    ("train",),
    ("tools",),
    ("eval",),
    ("pipeline", "report"),
    ("cli",),
]
CLI_LAYER = len(LAYERS) - 1
ENTRY_POINTS = ("cli", "__main__")  # module names that belong to the cli layer wherever they are
MAX_FUNCTION_LINES = 60


@dataclass
class Module:
    name: str  # dotted, e.g. moecpt.data.mixture ("moecpt.data" for data/__init__.py)
    path: Path
    tree: ast.Module
    is_package: bool
    rel: str  # the path as the messages show it, e.g. src/moecpt/data/mixture.py

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass
class Edge:
    importer: str
    imported: str
    line: int


@dataclass
class Graph:
    modules: dict[str, Module]
    edges: list[Edge] = field(default_factory=list)
    # per module: local name -> the moecpt module it is bound to by an import
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)


def parse_modules(src: Path) -> dict[str, Module]:
    out = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        out[name] = Module(name, path, tree, is_package, str(path.relative_to(src.parent)))
    return out


def _owning_module(dotted: str, known: dict[str, Module]) -> str | None:
    """The longest prefix of `dotted` that is a moecpt module (`moecpt.config.X` -> moecpt.config)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def _from_base(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.package.split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def graph(src: Path = SRC) -> Graph:
    """Every module under src/moecpt, its imports (edges) and the names its imports bind."""
    known = parse_modules(src)
    g = Graph(known)
    for mod in known.values():
        names: dict[str, str] = {}
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = _owning_module(a.name, known)
                    if target is None:
                        continue
                    g.edges.append(Edge(mod.name, target, node.lineno))
                    if a.asname:
                        names[a.asname] = target
                    else:  # `import moecpt.a.b`: used as `moecpt.a.b.name`
                        names[a.name] = target
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(mod, node)
                if base.split(".")[0] != ROOT:
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    target = sub if sub in known else _owning_module(base, known)
                    if target is None:
                        continue
                    g.edges.append(Edge(mod.name, target, node.lineno))
                    if sub in known:
                        names[a.asname or a.name] = sub
        g.aliases[mod.name] = names
    return g


def _where(g: Graph, module: str, line: int) -> str:
    return f"{g.modules[module].rel}:{line}"


# ---- (a) no import cycle ---------------------------------------------------------------------------------
def _strongly_connected(nodes: list[str], succ: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def import_cycles(g: Graph) -> list[str]:
    succ: dict[str, set[str]] = defaultdict(set)
    for e in g.edges:
        if e.importer != e.imported:
            succ[e.importer].add(e.imported)
    problems = []
    for comp in _strongly_connected(sorted(g.modules), succ):
        if len(comp) < 2:
            continue
        members = set(comp)
        lines = [
            f"  {_where(g, e.importer, e.line)}: {e.importer} imports {e.imported}"
            for e in g.edges
            if e.importer in members and e.imported in members and e.importer != e.imported
        ]
        problems.append(f"cycle between {', '.join(comp)}:\n" + "\n".join(sorted(set(lines))))
    return problems


def test_no_import_cycle():
    problems = import_cycles(graph())
    if problems:
        pytest.fail("import cycles (break each one):\n" + "\n".join(problems), pytrace=False)


# ---- (b) no upward import --------------------------------------------------------------------------------
def layer_of(name: str) -> int | None:
    """The layer index of a module; None for moecpt/__init__.py (exempt)."""
    if name == ROOT:
        return None
    parts = name.split(".")
    if parts[-1] in ENTRY_POINTS:
        return CLI_LAYER
    for i, members in enumerate(LAYERS):
        if parts[1] in members:
            return i
    raise AssertionError(f"{name}: not in any layer; add its package to LAYERS in tests/test_structure.py")


def _layer_name(i: int) -> str:
    return "/".join(LAYERS[i])


def upward_imports(g: Graph) -> list[str]:
    problems = []
    for e in g.edges:
        a, b = layer_of(e.importer), layer_of(e.imported)
        if a is not None and b is not None and b > a:
            problems.append(
                f"  {_where(g, e.importer, e.line)}: {e.importer} ({_layer_name(a)}) imports {e.imported} "
                f"({_layer_name(b)})"
            )
    return problems


def test_every_module_has_a_layer():
    for name in graph().modules:
        layer_of(name)


def test_no_package_imports_a_layer_above_it():
    problems = upward_imports(graph())
    order = " < ".join(_layer_name(i) for i in range(len(LAYERS)))
    if problems:
        pytest.fail(f"imports of a higher layer (order: {order}):\n" + "\n".join(problems), pytrace=False)


# ---- (c) no private name across modules ------------------------------------------------------------------
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module_outside_its_package(importer: Module, target: str) -> bool:
    """`moecpt.kernels.support` is private to moecpt.kernels: modules of that package may import it."""
    parts = target.split(".")
    for i, p in enumerate(parts):
        if _private(p):
            owner = ".".join(parts[:i])
            return not (importer.name == owner or importer.name.startswith(owner + "."))
    return False


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _module_named(dotted: str, names: dict[str, str], known: dict[str, Module]) -> str | None:
    """The moecpt module that `dotted` names in a file with these import bindings, or None."""
    if dotted in names:  # an alias, a from-imported submodule, or `moecpt.a.b` after `import moecpt.a.b`
        return names[dotted]
    head, _, rest = dotted.partition(".")
    # `pkg.sub` after `from moecpt import pkg`
    if head in names and rest and f"{names[head]}.{rest}" in known:
        return f"{names[head]}.{rest}"
    return None


def private_crossings(g: Graph) -> list[str]:
    problems = []
    for mod in g.modules.values():
        names = g.aliases[mod.name]
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.ImportFrom):
                base = _from_base(mod, node)
                if base.split(".")[0] != ROOT:
                    continue
                bad = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    target = sub if sub in g.modules else _owning_module(base, g.modules)
                    if target is None or target == mod.name:
                        continue
                    if (_private(a.name) and sub not in g.modules) or _private_module_outside_its_package(
                        mod, target
                    ):
                        bad.append(a.name)
                if bad:
                    problems.append(
                        f"  {_where(g, mod.name, node.lineno)}: from {base} import {', '.join(bad)}"
                    )
            elif isinstance(node, ast.Import):
                for a in node.names:
                    target = _owning_module(a.name, g.modules)
                    if target and _private_module_outside_its_package(mod, target):
                        problems.append(f"  {_where(g, mod.name, node.lineno)}: import {a.name}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                dotted = _dotted(node.value)
                target = _module_named(dotted, names, g.modules) if dotted else None
                if target is not None and target != mod.name:
                    problems.append(f"  {_where(g, mod.name, node.lineno)}: {dotted}.{node.attr} ({target})")
    return sorted(set(problems))


def test_no_private_name_crosses_modules():
    problems = private_crossings(graph())
    if problems:
        pytest.fail(
            "private names used from another module (make them public, or move the code to where it is used):\n"
            + "\n".join(problems),
            pytrace=False,
        )


# ---- (d) short functions ---------------------------------------------------------------------------------
def long_functions(g: Graph) -> list[str]:
    problems = []
    for mod in g.modules.values():
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # the `def` line on: decorators excluded
                if n > MAX_FUNCTION_LINES:
                    problems.append(f"  {_where(g, mod.name, node.lineno)}: {node.name} is {n} lines")
    return problems


def test_no_function_over_60_lines():
    problems = long_functions(graph())
    if problems:
        pytest.fail(
            f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(problems), pytrace=False
        )


# ---- (e) one definition of each shared thing -------------------------------------------------------------
def definitions(g: Graph, kind: str, name: str) -> list[str]:
    found = []
    for mod in g.modules.values():
        for node in ast.walk(mod.tree):
            if kind == "assignment":
                targets = node.targets if isinstance(node, ast.Assign) else []
                if isinstance(node, ast.AnnAssign):
                    targets = [node.target]
                hit = any(isinstance(t, ast.Name) and t.id == name for t in targets)
            else:
                hit = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
            if hit:
                found.append(f"  {_where(g, mod.name, node.lineno)}")
    return found


@pytest.mark.parametrize(("kind", "name"), [
    ("assignment", "IGNORE_INDEX"),
    ("function", "bits_per_byte"),
    ("function", "init_weights"),  # the init rule's one driver (each family says "ones" or "normal" per name)
    ("function", "load_balancing_loss"),  # the loss module's parts
    ("function", "router_z_loss"),
    ("function", "linear_cross_entropy"),
    ("function", "load_model"),  # the one model loader (HF directory, checkpoint or run directory)
    ("function", "from_pretrained"),
])
def test_exactly_one_definition(kind, name):
    found = definitions(graph(), kind, name)
    if len(found) != 1:
        pytest.fail(
            f"{name} must be defined exactly once in src/, found {len(found)}:\n" + "\n".join(found),
            pytrace=False,
        )


# ---- the checker checks itself ---------------------------------------------------------------------------
FAKE_TREE = {
    "errors.py": "class UserError(Exception): ...\n",
    "config.py": "import moecpt.train.loop\n_SECRET = 1\nIGNORE_INDEX = -100\n",
    "kernels/__init__.py": "",
    "kernels/_impl.py": "def fast(): ...\n",
    "kernels/op.py": "from moecpt.kernels._impl import fast\n",
    "model/__init__.py": "",
    "model/a.py": "def f():\n    from moecpt.model import b\n",
    "model/b.py": "from . import a\nfrom moecpt.data import reader\n",
    "data/__init__.py": "",
    "data/reader.py": "import moecpt.config as cfg\n\ndef g():\n    return cfg._SECRET\n",
    "train/__init__.py": "",
    "train/loop.py": (
        "from moecpt.config import _SECRET, IGNORE_INDEX\nfrom moecpt.kernels._impl import fast\n"
        "IGNORE_INDEX: int = -100\n\n\ndef long():\n" + "    x = 1\n" * 60
    ),
    "train/cli.py": "import moecpt.pipeline.run\n",
    "pipeline/__init__.py": "",
    "pipeline/run.py": "from moecpt import train\n\ndef h():\n    return train.loop._x\n",
}


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Graph:
    src = tmp_path_factory.mktemp("fake") / "src"
    for rel, text in FAKE_TREE.items():
        path = src / ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return graph(src)


def test_checker_sees_cycles_with_function_local_relative_and_submodule_imports(fake):
    cycles = import_cycles(fake)
    assert len(cycles) == 2  # config <-> train.loop, and this one:
    (cycle,) = [c for c in cycles if c.startswith("cycle between moecpt.model.a, moecpt.model.b:")]
    assert "src/moecpt/model/a.py:2: moecpt.model.a imports moecpt.model.b" in cycle
    assert "src/moecpt/model/b.py:1: moecpt.model.b imports moecpt.model.a" in cycle


def test_checker_sees_upward_imports_and_lets_cli_modules_import_anything(fake):
    found = "\n".join(upward_imports(fake))
    assert "src/moecpt/config.py:1: moecpt.config (errors/config) imports moecpt.train.loop (train)" in found
    assert "model/b.py" not in found  # model and data are one layer
    assert "train/cli.py" not in found
    assert len(upward_imports(fake)) == 1


def test_checker_sees_private_names_crossing_modules(fake):
    assert private_crossings(fake) == [
        "  src/moecpt/data/reader.py:4: cfg._SECRET (moecpt.config)",
        "  src/moecpt/pipeline/run.py:4: train.loop._x (moecpt.train.loop)",
        "  src/moecpt/train/loop.py:1: from moecpt.config import _SECRET",
        "  src/moecpt/train/loop.py:2: from moecpt.kernels._impl import fast",
    ]  # kernels/op.py may use its own package's private module


def test_checker_counts_function_lines_and_definitions(fake):
    assert long_functions(fake) == ["  src/moecpt/train/loop.py:6: long is 61 lines"]
    assert definitions(fake, "assignment", "IGNORE_INDEX") == [
        "  src/moecpt/config.py:3",
        "  src/moecpt/train/loop.py:3",
    ]
    assert definitions(fake, "function", "long") == ["  src/moecpt/train/loop.py:6"]


def test_the_cycle_finder_finds_cycles():
    succ = defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    comps = _strongly_connected(["a", "b", "c", "d"], succ)
    assert sorted(map(sorted, comps)) == [["a", "b", "c"], ["d"]]


def test_parameter_names_are_written_only_by_the_adapters():
    """moecpt's parameter names come from the modules; their Hugging Face names are written only by the
    state-dict adapters (the generic one and the families'): no other module spells a tensor name."""
    g = graph()
    found = sorted({mod.name for mod in g.modules.values() for node in ast.walk(mod.tree)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and ("q_proj.weight" in node.value or "experts.gate_up_proj" in node.value
                         or "block_sparse_moe" in node.value)})
    assert found and all(m == "moecpt.model.adapter" or m.startswith("moecpt.model.families.") for m in found), found

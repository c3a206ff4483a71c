"""Arrows one way: walk every import in `speculators/` (top-level and inside functions) and
fail on one that runs up the layering below, on an import cycle between two packages of
the same layer, and on any import of the dashboard/worker/store packages.

Layers, lowest first (a package may import its own layer's packages and lower layers):
  0  speculators (version), errors, atomic (file writes), console (the log format), progress
     (stage progress lines), metric_records (the typed metrics.jsonl records), process (managed
     child processes: start, readiness, stop, lifelines)
  1  layers (layer-id rules), verifier (reading the verifier: config, weights, hidden states)
  2  data, models (core math and the draft model), config (the typed run settings)
  3  vllm, datagen, online, evaluate, regenerate, tiny (the stages' services and the embedded
     verifier builders; no cycles among them)
  4  train
  5  commands, cli, __main__ (the command line)
Test helpers live in tests/support/, outside the package (the `tests` root is forbidden).
"""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS: list[set[str]] = [
    {"speculators", "speculators.errors", "speculators.atomic", "speculators.console", "speculators.progress",
     "speculators.metric_records", "speculators.process"},
    {"speculators.layers", "speculators.verifier"},
    {"speculators.data", "speculators.models", "speculators.config"},
    {"speculators.vllm", "speculators.datagen", "speculators.online", "speculators.evaluate",
     "speculators.regenerate", "speculators.tiny"},
    {"speculators.train"},
    {"speculators.commands", "speculators.cli", "speculators.__main__"},
]
FORBIDDEN_ROOTS = ("app", "worker", "runstore", "tests")

# Known violations another helper's branch removes (helper "vllm": the vllm <-> evaluate cycle).
# Entries are (importing module, imported module); an entry that no longer occurs fails the test so the list only shrinks.
ALLOWED: set[tuple[str, str]] = {
    ("speculators.vllm.metrics", "speculators.evaluate.report"),
}

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module `path` imports (absolute names), including imports inside functions."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from speculators import train` imports the subpackage
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def package_of(module: str, known: set[str]) -> str | None:
    """The layered package a module belongs to (longest known prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def violations(root: Path, layers: list[set[str]], allowed: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Upward imports, same-layer cycles, forbidden roots and unlayered packages under `root`."""
    level = {pkg: i for i, group in enumerate(layers) for pkg in group}
    known = set(level)
    problems: list[str] = []
    edges: dict[tuple[str, str], tuple[str, str]] = {}
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        mine = package_of(me, known - {root.name}) or (me if me == root.name else None)
        if mine is None:
            problems.append(f"{me}: its package is in no layer; add it to LAYERS in {Path(__file__).name}")
            continue
        for target in sorted(imports_of(path, root)):
            top = target.split(".")[0]
            if top in FORBIDDEN_ROOTS:
                problems.append(f"{me} imports {target}: the package never imports {', '.join(FORBIDDEN_ROOTS)}")
                continue
            if top != root.name:
                continue
            theirs = package_of(target, known - {root.name}) or (root.name if target == root.name else None)
            if theirs is None:
                if target.rpartition(".")[0] == root.name or target == root.name:
                    continue  # `from speculators import __version__`: a name, not a module
                problems.append(f"{me} imports {target}: no layer holds it")
                continue
            if any(me == a and (target == b or target.startswith(b + ".")) for a, b in allowed):
                continue
            if level[theirs] > level[mine]:
                problems.append(f"{me} imports {target}: layer {level[theirs]} ({theirs}) above layer {level[mine]} ({mine})")
            elif level[theirs] == level[mine] and theirs != mine:
                edges.setdefault((mine, theirs), (me, target))
    for (a, b), (me, target) in sorted(edges.items()):
        if (b, a) in edges and a < b:
            other = edges[(b, a)]
            problems.append(f"cycle between {a} and {b}: {me} imports {target} and {other[0]} imports {other[1]}")
    return problems


def test_speculators_imports_only_downward():
    problems = violations(REPO / "speculators", LAYERS, ALLOWED)
    assert not problems, "\n".join(problems)


def test_allow_list_holds_only_live_violations():
    """Each allowed entry still occurs (else remove it: the list only shrinks)."""
    root = REPO / "speculators"
    live = set()
    for path in root.rglob("*.py"):
        me = module_name(path, root)
        live.update((me, t) for t in imports_of(path, root))
    stale = sorted((a, b) for a, b in ALLOWED if not any(m == a and (t == b or t.startswith(b + ".")) for m, t in live))
    assert not stale, f"no longer imported, remove from ALLOWED: {stale}"


def module_problems(package: Path) -> list[str]:
    """Inside one package: import cycles between its modules, and a module importing a sibling's
    private (``_name``) name; the shared pieces belong in a module both import, under a public name."""
    root = package
    while (root.parent / "__init__.py").exists():
        root = root.parent
    mods = {module_name(p, root): p for p in sorted(package.glob("*.py")) if p.name != "__init__.py"}
    graph: dict[str, set[str]] = {}
    problems = []
    for me, path in mods.items():
        graph[me] = {t for t in imports_of(path, root) if t in mods and t != me}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in mods and node.module != me:
                problems += [f"{me} imports the private name {a.name} from {node.module}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                problems.append("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    return problems


def test_data_modules_form_no_cycle_and_share_no_private_names():
    problems = module_problems(REPO / "speculators" / "data")
    assert not problems, "\n".join(problems)


def test_module_checker_catches_cycles_and_private_names(tmp_path):
    pkg = tmp_path / "speculators"
    _write(pkg, "__init__.py", "")
    _write(pkg, "data/__init__.py", "")
    _write(pkg, "data/a.py", "from speculators.data.b import _hidden\n")
    _write(pkg, "data/b.py", "def f():\n    from .a import x\n")  # lazy and relative: still a cycle
    _write(pkg, "data/c.py", "from speculators.data.a import y\n")
    found = module_problems(pkg / "data")
    assert "speculators.data.a imports the private name _hidden from speculators.data.b" in found
    assert "import cycle: speculators.data.a -> speculators.data.b -> speculators.data.a" in found
    assert len(found) == 2


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_catches_upward_lazy_and_relative_imports_and_cycles(tmp_path):
    pkg = tmp_path / "speculators"
    _write(pkg, "__init__.py", "")
    _write(pkg, "errors.py", "")
    _write(pkg, "models/__init__.py", "")
    _write(pkg, "models/m.py", "def f():\n    from speculators.train.t import x\n")  # lazy, upward
    _write(pkg, "models/r.py", "from ..train import t\n")  # relative, upward
    _write(pkg, "train/__init__.py", "")
    _write(pkg, "train/t.py", "import worker.tasks\nfrom speculators.models import m\n")
    _write(pkg, "vllm/__init__.py", "from speculators.evaluate import e\n")
    _write(pkg, "evaluate/e.py", "import importlib\nimportlib.import_module('speculators.vllm')\n")
    _write(pkg, "newpkg/__init__.py", "")
    layers = [{"speculators", "speculators.errors"}, {"speculators.models"},
              {"speculators.vllm", "speculators.evaluate"}, {"speculators.train"}]
    found = "\n".join(violations(pkg, layers))
    assert "speculators.models.m imports speculators.train.t: layer 3" in found
    assert "speculators.models.r imports speculators.train" in found
    assert "speculators.train.t imports worker.tasks" in found
    assert "cycle between speculators.evaluate and speculators.vllm" in found
    assert "speculators.newpkg: its package is in no layer" in found
    assert "speculators.train.t imports speculators.models" not in found  # downward is fine
    assert violations(pkg, layers, {("speculators.models.m", "speculators.train.t")}) != []


# Rooms outside the package (docs/ARCHITECTURE.md): the run store stands alone (it reads the
# typed metric records, a module that imports nothing of the project), the worker never
# reaches into the dashboard, and nothing imports the dashboard or the tests.
ROOM_RULES = {"runstore": ("app", "worker", "speculators", "tests"), "worker": ("app", "tests"), "app": ("tests",)}
ROOM_ALLOWED = {"runstore": ("speculators.metric_records",)}


def room_violations(room: Path, banned: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in sorted(room.rglob("*.py")):
        for target in sorted(imports_of(path, room)):
            if any(target == a or target.startswith(a + ".") for a in allowed):
                continue
            if target.split(".")[0] in banned:
                found.append(f"{module_name(path, room)} imports {target}")
    return found


def test_rooms_outside_the_package_import_one_way():
    problems = [p for room, banned in ROOM_RULES.items()
                for p in room_violations(REPO / room, banned, ROOM_ALLOWED.get(room, ()))]
    assert not problems, "\n".join(problems)
    assert room_violations(REPO / "app", ("worker",))  # the checker sees the dashboard's real imports

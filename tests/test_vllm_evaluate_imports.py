"""The arrow between speculators.vllm and speculators.evaluate points one way: vllm may use
evaluate's report types, evaluate never imports vllm (issue 13: no cycles). Read from the
source (ast), so lazy imports inside functions count too."""

import ast
from pathlib import Path

import speculators

ROOT = Path(speculators.__file__).parent


def _imports(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        out[str(path.relative_to(ROOT))] = names
    return out


def test_evaluate_does_not_import_vllm():
    bad = {f: sorted(n for n in names if n.startswith("speculators.vllm"))
           for f, names in _imports("evaluate").items()}
    assert not {f: n for f, n in bad.items() if n}


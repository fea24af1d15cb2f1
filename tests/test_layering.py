"""Package layering: the core packages (lcm/, models/, solvers/) import neither the demo world
(demo/) nor the test-only oracles (diffusers, transformers, peft). Read from the source with `ast`,
so an import inside a function or under `if TYPE_CHECKING` counts too."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ("lcm", "models", "solvers")
FORBIDDEN = ("demo", "diffusers", "transformers", "peft")
# Issue 28 item 5: PickScore and ImageReward wrap transformers' CLIP / BLIP classes, imported inside the
# function that builds them (only when the metric is chosen; requirements-rewards.txt), never at top level.
LAZY_ALLOWED = {"lcm/evaluation/rewards.py": {"transformers"}}

#----------------------------------------------------------------------------


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.append((node.lineno, str(node.args[0].value)))          # importlib.import_module("x")
    return out


def core_files() -> list[pathlib.Path]:
    files = sorted(p for pkg in CORE for p in (ROOT / pkg).rglob("*.py"))
    assert files, f"no Python files under {CORE}"
    return files


def test_finds_imports(tmp_path):
    """The parser sees top-level, nested and importlib imports (relative ones stay inside a package)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import a.b\nfrom c import d\ndef f():\n    import demo.world\n"
                     "importlib.import_module('peft')\nfrom . import x\n")
    assert sorted(m for _, m in imported_modules(probe)) == ["a.b", "c", "demo.world", "peft"]


def top_level_modules(path: pathlib.Path) -> set[str]:
    """Modules imported by the file's module-level statements (not inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {a.name if isinstance(n, ast.Import) else n.module for n in tree.body
            if isinstance(n, (ast.Import, ast.ImportFrom)) for a in (n.names if isinstance(n, ast.Import) else [n])}


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_does_not_import_demo_or_oracles(path):
    rel = str(path.relative_to(ROOT))
    lazy = LAZY_ALLOWED.get(rel, set())
    assert not {m.split(".")[0] for m in top_level_modules(path) if m} & lazy, f"{rel}: {lazy} only lazily"
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in imported_modules(path)
           if name.split(".")[0] in FORBIDDEN and name.split(".")[0] not in lazy]
    assert not bad, "core modules must not import " + ", ".join(FORBIDDEN) + ":\n" + "\n".join(bad)


def _module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_no_import_cycle_among_core_modules():
    """No cycle in the import graph of lcm/, models/, solvers/, counting imports inside functions and
    under TYPE_CHECKING (a lazy import must not hide one); a package's __init__ counts as a module."""
    files = {_module_of(p): p for p in core_files()}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for _, name in imported_modules(path):
            parts = name.split(".")                       # `from a.b import c`: a.b.c if a module, else a.b
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in files:
                    targets.add(".".join(parts[:n]))
                    break
        parents = {".".join(t.split(".")[:n]) for t in targets for n in range(1, t.count(".") + 1)}
        targets |= {p for p in parents if p in files and not mod.startswith(p + ".")}   # their __init__ runs first
        graph[mod] = targets - {mod}
    for mod, path in files.items():                       # `from pkg import mod` names a submodule
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in files:
                graph[mod] |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files} - {mod}
    state, stack = {}, []

    def visit(m):                                         # depth-first search; a grey node met again closes a cycle
        state[m] = "grey"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "grey":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "black"
    for m in sorted(graph):
        if m not in state:
            visit(m)

"""The framework's shape, checked: imports form no circle and point down the floors, every framework
file owns one job at a readable size, and no script edits ``sys.path``."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The floors, lowest first: a module imports from its own floor or below, never above.
FLOORS = ["utils", "models", "attack", "defense", "analysis", "sweeps", "tools"]
MAX_FRAMEWORK_LINES = 350


def _is_script(path: Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text()


def _modules() -> dict[str, Path]:
    found = {}
    for floor in FLOORS:
        for path in sorted((ROOT / floor).glob("*.py")):
            name = floor if path.stem == "__init__" else f"{floor}.{path.stem}"
            found[name] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at any depth of the file (lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_the_imports_form_no_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_every_import_points_down_the_floors():
    upward = [f"{a} imports {b}" for a, targets in _graph().items() for b in targets
              if FLOORS.index(b.split(".")[0]) > FLOORS.index(a.split(".")[0])]
    assert not upward, upward


def test_framework_files_stay_readable():
    """Scripts (an attack, a defense, a tool) may be as long as their algorithm; the framework under
    them is split so that each file owns one job."""
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _modules().values() if not _is_script(p)
            for n in [len(p.read_text().splitlines())] if n > MAX_FRAMEWORK_LINES]
    assert not long, long


def test_each_framework_file_says_what_it_owns():
    silent = [str(p.relative_to(ROOT)) for p in _modules().values()
              if not _is_script(p) and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not silent, silent


def test_no_file_edits_sys_path():
    """The package is installed (``pip install -e .``): no script reaches the framework by editing ``sys.path``."""
    calls = ("sys.path." + "insert", "sys.path." + "append")  # spelled apart: this file is searched too
    editing = [str(p.relative_to(ROOT)) for folder in FLOORS + ["tests"] for p in (ROOT / folder).glob("*.py")
               if any(call in p.read_text() for call in calls)]
    assert not editing, editing

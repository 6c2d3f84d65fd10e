"""The package's imports flow one way, function-level imports included (DESIGN.md):

errors, paths, series -> config -> run_dir -> parallel -> data -> model -> objectives -> train -> eval -> scaling
-> interop -> info -> cli

A module may import only from its own layer or layers to its left, and no set of modules may import
each other in a circle. Imports of other packages (jax, TensorFlow, torch) are not counted.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "scaling_jax"
ORDER = ["errors", "log", "paths", "series", "config", "run_dir", "parallel", "data", "model", "objectives", "train",
         "eval", "scaling", "interop", "info", "cli"]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["scaling_jax", *path.relative_to(PACKAGE).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules of this package that ``path`` imports anywhere in its body (``from a import b`` counts ``a.b``
    when ``b`` is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known and name != "scaling_jax":
                found.add(name)
    return found


def _layer(module: str) -> int:
    name = module.split(".")[1] if "." in module else ""
    return ORDER.index(name) if name in ORDER else -1


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t in _imports(p, set(mods)) if t != m and not m.startswith(t + ".")} for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert [m for m in _graph() if m != "scaling_jax" and _layer(m) < 0] == []


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{m} imports {t}" for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m) >= 0]
    assert upward == []


def test_no_import_cycles():
    graph, cycles = _graph(), []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for target in sorted(graph.get(node, ())):
            if target in stack:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in done:
                visit(target, stack + [target], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], done)
    assert cycles == []


def test_each_run_directory_name_is_spelled_in_run_dir_py_only():
    """Readers and writers of a run directory share its names through ``run_dir.py`` (one place to change)."""
    import re

    from scaling_jax import run_dir

    names = [run_dir.CONFIG_FILE, run_dir.METRICS_FILE, run_dir.SUMMARY_FILE, run_dir.LINEAGE_FILE, run_dir.MARKER,
             run_dir.CHECKPOINT_DIR, run_dir.DAMAGED_DIR, run_dir.LOCK_FILE, run_dir.TENSORBOARD_DIR]
    spelled = {name: sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                            if re.search(rf"[\"']{re.escape(name)}[\"']", p.read_text())) for name in names}
    assert spelled == {name: ["run_dir.py"] for name in names}

"""The package's import rules: no cycles, and sampling code never imports training code.

Read from the source (ast), every `import` statement counted, including those inside functions.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unclip_jax")


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, modules: dict[str, str], *, top_level_only: bool) -> set[str]:
    """The package modules `path` imports (`from a import b` counts a.b when it is a module)."""
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def test_no_module_outside_training_imports_the_tasks_or_the_loop():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        if name.startswith(("unclip_jax.train.", "unclip_jax.tasks")) or name == "unclip_jax.train":
            continue
        bad = {m for m in _imports(path, modules, top_level_only=False)
               if m.startswith("unclip_jax.tasks") or m in ("unclip_jax.train.loop", "unclip_jax.train.restore")}
        offenders += [f"{name} imports {m}" for m in sorted(bad)]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle_among_the_package_modules():
    modules = _modules()
    graph = {name: _imports(path, modules, top_level_only=False) - {name} for name, path in modules.items()}
    # A package's __init__ is imported before its modules: importing a.b imports a.
    for name in list(graph):
        parent = name.rsplit(".", 1)[0]
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
        del parent
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["unclip_jax.pipeline", "unclip_jax.manipulations", "unclip_jax.sampling",
                                    "unclip_jax.stages.load"])
def test_sampling_modules_import_without_the_training_code(module):
    modules = _modules()
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += _imports(modules[m], modules, top_level_only=False)
    assert not {m for m in seen if m.startswith("unclip_jax.tasks") or m == "unclip_jax.train.loop"}

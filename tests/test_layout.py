"""The package's layout: no module imports another that (directly or through others) imports it back.

Every import statement counts, those inside functions too: a lazy import that closes a cycle still ties two ideas
together (and is one refactoring away from an ImportError)."""

import ast
import os

import mara_hf

ROOT = os.path.dirname(mara_hf.__file__)


def module_names() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def imports(name: str, path: str, modules: dict) -> set[str]:
    """The package's modules that `name` imports, anywhere in its code."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            # `from pkg import sub` imports the submodule `sub` when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    modules = module_names()
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    assert graph["mara_hf.decoding.processor"], "the parser found no imports: the test would pass vacuously"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_trainers_and_configs_are_importable_from_the_package_without_loading_training_first():
    import subprocess
    import sys

    code = ("import sys, mara_hf; assert 'mara_hf.training.sac_trainer' not in sys.modules; "
            "from mara_hf import MaraTrainer, MaraTrainingConfig, ImitationTrainer, ImitationConfig; "
            "from mara_hf.training.sac_trainer import MaraTrainer as T; assert MaraTrainer is T; "
            "print(MaraTrainingConfig().episodes, ImitationConfig().rounds)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                         **__import__("os").environ})
    assert out.returncode == 0, out.stderr

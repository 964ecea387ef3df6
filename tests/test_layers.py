"""The import graph, read from the sources (ast): layers point one way, no cycles, and imports inside functions only
for optional heavy packages."""

import ast
from pathlib import Path

from tests.helpers import ROOT

# Higher imports lower, never the reverse: main -> api -> serving -> flux_pipeline -> the library (lora_loading,
# float8_quantize, util and their helpers) -> modules -> kernels. Modules of one layer may import each other
# when the graph stays acyclic.
LAYERS = {
    "main": 7, "main_gr": 7, "cache_dir": 7, "replicas": 7, "ray_serve": 7, "configs": 7,  # entry points and tools
    "api": 6,
    "serving": 5,
    "flux_pipeline": 4, "batching": 4,
    "lora_loading": 3, "lora_formats": 3, "lora_fusing": 3, "float8_quantize": 3, "util": 3, "encoder_quantize": 3,
    "images": 3, "cuda_graphs": 3, "errors": 3, "model_spec": 3, "legacy": 3, "f8_original": 3, "hub": 3,
    "checkpoint_source": 3, "compile_cache": 3,
    "modules": 2,
    "kernels": 1,
}  # fmt: skip
ENTRY = 7  # what runs under `if __name__ == "__main__":` is a script, at the entry points' layer
# imported where used: optional packages, so installs without them work, and transformers, whose import takes
# seconds that only loading the text encoders needs
OPTIONAL = ("bitsandbytes", "optimum", "cudnn", "transformers", "gradio")
# main.py imports the library after `--cache-dir` has pointed torch's caches at their folder
DEFERRED = {"main": ("flux_pipeline", "util", "api", "serving", "compile_cache")}


def sources() -> dict[str, Path]:
    """Every project module outside tests/ and bench/, by dotted name."""
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench", "build", "dist") or any(part.startswith(".") for part in rel.parts):
            continue
        found[".".join(rel.with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "__name__" in ast.unparse(test) and "__main__" in ast.unparse(test)


def imports(tree: ast.Module, inside_main_guard: bool = False):
    """(imported module, line, in a function, in the main guard) for every import statement."""

    def visit(node: ast.AST, in_function: bool, in_guard: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, in_function, in_guard
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                yield child.module, child.lineno, in_function, in_guard
                for alias in child.names:  # `from kernels import fp8_linear` imports kernels.fp8_linear
                    yield f"{child.module}.{alias.name}", child.lineno, in_function, in_guard
            else:
                function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                yield from visit(child, in_function or function, in_guard or is_main_guard(child))

    yield from visit(tree, False, inside_main_guard)


def graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = sources()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for name, path in modules.items():
        own = layer(name)
        assert own is not None, f"{name} has no layer: add it to LAYERS (and to the README's code map)"
        for target, line, in_function, in_guard in imports(ast.parse(path.read_text())):
            project = target in modules
            deferred = target.split(".")[0] in DEFERRED.get(name, ())
            if in_function and not target.startswith(OPTIONAL) and not deferred:
                if project or not target.startswith(("torch", "triton")):
                    problems.append(f"{name}:{line} imports {target} inside a function")
            if not project:
                continue
            if (ENTRY if in_guard else own) < layer(target):
                problems.append(f"{name}:{line} imports {target}, a higher layer")
            if not in_guard and target != name and not name.startswith(f"{target}."):
                edges[name].add(target)
    return edges, problems


def test_layers_point_one_way_and_function_imports_are_optional_packages():
    _, problems = graph()
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    edges, _ = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_check_sees_a_wrong_edge(tmp_path):
    """The reader itself: an upward import, one inside a function and one in a main guard are told apart."""
    tree = ast.parse(
        "import torch\nfrom serving import jobs\n"
        "def f():\n    import util\n    import cudnn\n"
        "if __name__ == '__main__':\n    import main\n"
    )
    found = {(t, f, g) for t, _, f, g in imports(tree)}
    assert ("serving.jobs", False, False) in found and ("util", True, False) in found
    assert ("cudnn", True, False) in found and ("main", False, True) in found
    assert layer("serving.jobs") > layer("modules.layers") > layer("kernels.common")

"""The package's imports flow one way: each module imports only modules of lower layers.

Read with `ast` (nothing is imported), so an import cycle or an import from a
lower layer into a higher one fails here, naming both modules. A new module
must be given its layer below.
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "visualizer"

# Lower numbers are lower layers: capture -> cache -> analysis -> plot.
LAYERS = {
    "_errors": 0, "_compat": 0, "_warnings": 0, "_torch_internals": 0,
    "_ranks": 1, "_arrays": 1, "_graph_sink": 1, "policy": 1, "_pool": 1, "_rewrite": 1, "_environment": 2,
    "snapshot": 2, "store": 3, "files": 4, "capture": 4, "_modes": 4,
    "weights": 5, "geometry": 5, "_in_graph": 6, "maps": 6, "fused": 7, "attention": 7, "distributed": 8,
    "analysis": 8, "plot": 9, "explorer": 9, "__init__": 10,
}


def imports_of(path):
    """The package's modules that `path` imports, anywhere in it (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visualizer."):
            found.add(node.module.split(".")[1])
    return found


def test_every_module_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules - set(LAYERS) == set(), "give these modules a layer in LAYERS"


def test_imports_only_go_down():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        for target in imports_of(path):
            if target in LAYERS and LAYERS[target] >= LAYERS[path.stem]:
                upward.append(f"{path.stem} (layer {LAYERS[path.stem]}) imports {target} "
                              f"(layer {LAYERS[target]})")
    assert upward == []


def test_the_store_knows_no_owner():
    for lower in ("store", "policy", "snapshot", "_pool", "files"):
        assert not imports_of(PACKAGE / f"{lower}.py") & {"capture", "attention", "fused"}, lower

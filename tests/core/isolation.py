"""Helpers for tests of what outlives what: fresh code, traced memory, a process without us."""
import gc
import pickle
import subprocess
import sys
import textwrap
import tracemalloc

# Loads the pickle named by argv[1] with this package unimportable and prints the
# repr of its shape: dicts and lists as {type: ...}, anything else as module.type.
_LOAD_WITHOUT_THE_PACKAGE = textwrap.dedent(
    """
    import pickle, sys
    sys.modules["visualizer"] = None  # import visualizer now raises ImportError
    with open(sys.argv[1], "rb") as file:
        loaded = pickle.load(file)

    def describe(value):
        if isinstance(value, dict):
            return {type(value).__name__: {k: describe(v) for k, v in value.items()}}
        if isinstance(value, list):
            return {"list": [describe(v) for v in value]}
        return type(value).__module__ + "." + type(value).__name__

    print(repr(describe(loaded)))
    """
)


def defined(source, **names):
    """The namespace `source` defines: its code objects belong to nothing else."""
    namespace = dict(names, __name__="isolated_case")
    exec(compile(textwrap.dedent(source), "<isolated case>", "exec"), namespace)
    return namespace


def traced_growth(work):
    """Bytes of Python (and numpy) memory still held after work() and a collection."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def shape_loaded_elsewhere(tmp_path, value):
    """What `value` pickled loads as in a process where visualizer cannot be imported."""
    path = tmp_path / "pickled.pkl"
    path.write_bytes(pickle.dumps(value))
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_THE_PACKAGE, str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"loading without visualizer failed: {done.stderr[-800:]}"
    return eval(done.stdout)  # noqa: S307 - the repr of plain dicts, lists and strings

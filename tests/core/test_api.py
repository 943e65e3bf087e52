"""The get_local API: the original Visualizer's behaviour, then everything beyond it."""
import importlib
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

from visualizer import MISSING, VisualizerError, load_cache, save_cache


# -- the original API --------------------------------------------------------


def test_original_usage_activate_before_import(tmp_path):
    """The classic way, in a fresh interpreter: activate, then import the model."""
    (tmp_path / "classic_model.py").write_text(textwrap.dedent(
        """
        import numpy as np
        from visualizer import get_local

        class Attention:
            @get_local('attention_map')
            def forward(self, x):
                attention_map = np.full((2, 2), float(x))
                return x + 1
        """
    ))
    script = textwrap.dedent(
        """
        from visualizer import get_local
        get_local.activate()
        import classic_model
        assert get_local.is_activate is True
        assert [classic_model.Attention().forward(i) for i in range(3)] == [1, 2, 3]
        cache = get_local.cache
        print(sorted(cache), [float(m[0, 0]) for m in cache['Attention.forward']])
        taken = cache['Attention.forward']
        get_local.clear()
        print(get_local.cache, len(taken))
        """
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([repo, str(tmp_path)])},
        capture_output=True,
        text=True,
        check=True,
    )
    # Keys stay with new empty lists after clear(); lists taken before keep their maps.
    assert result.stdout.splitlines() == [
        "['Attention.forward'] [0.0, 1.0, 2.0]",
        "{'Attention.forward': []} 3",
    ]


def test_activate_after_import_and_deactivate_any_time(gl):
    def f(x):
        y = x * 2
        return y

    gl("y")(f)
    assert f(1) == 2 and gl.cache == {}
    gl.activate()
    f(2)
    gl.deactivate()
    f(3)
    gl.activate()
    f(4)
    assert gl.cache["test_activate_after_import_and_deactivate_any_time.<locals>.f"] == [4, 8]


def test_several_names_give_one_dict_per_call(gl):
    @gl("q", "k", "v")
    def attention(x):
        q, k = x + 1, x + 2
        v = q * k
        return v

    gl.activate()
    attention(1)
    attention(2)
    entries = gl.cache["test_several_names_give_one_dict_per_call.<locals>.attention"]
    assert entries == [{"q": 2, "k": 3, "v": 6}, {"q": 3, "k": 4, "v": 12}]


def test_decorating_again_adds_names(gl):
    def f(x):
        a = x + 1
        b = x + 2
        return a + b

    gl("a")(f)
    gl("b")(f)
    gl.activate()
    f(1)
    assert gl.cache[f.__qualname__] == [{"a": 2, "b": 3}]


def test_decorator_returns_the_same_object_and_keeps_its_attributes(gl):
    def documented(x: int) -> int:
        """Doc."""
        value = x
        return value

    original_code = documented.__code__
    assert gl("value")(documented) is documented
    gl.activate()
    assert documented.__name__ == "documented"
    assert documented.__qualname__.endswith("documented")
    assert documented.__doc__ == "Doc."
    assert documented.__annotations__ == {"x": int, "return": int}
    code_attributes = ["co_name", "co_filename", "co_firstlineno", "co_flags", "co_argcount",
                       "co_kwonlyargcount", "co_varnames", "co_freevars", "co_cellvars"]
    if hasattr(original_code, "co_qualname"):
        code_attributes.append("co_qualname")
    for attribute in code_attributes:
        assert getattr(documented.__code__, attribute) == getattr(original_code, attribute), attribute


def test_instrument_in_place_reaches_every_existing_reference(gl, module_dir):
    """A library's function, imported by name elsewhere, captured without editing it."""
    module_dir(
        "third_party_lib",
        """
        def attention(scores):
            weights = [s / sum(scores) for s in scores]
            return weights
        """,
    )
    module_dir(
        "third_party_user",
        """
        from third_party_lib import attention

        def model(scores):
            return attention(scores)
        """,
    )
    lib = importlib.import_module("third_party_lib")
    user = importlib.import_module("third_party_user")
    gl("weights")(lib.attention)
    gl.activate()
    assert user.model([1, 3]) == [0.25, 0.75]
    assert gl.cache["attention"] == [[0.25, 0.75]]
    gl.deactivate()
    user.model([1, 1])
    assert gl.cache["attention"] == [[0.25, 0.75]]


def test_same_qualname_in_two_modules_never_shares_a_list(gl, module_dir):
    source = """
        class Attention:
            def forward(self, x):
                attn = x * {factor}
                return attn
        """
    module_dir("model_a", source.format(factor=1))
    module_dir("model_b", source.format(factor=10))
    a = importlib.import_module("model_a")
    b = importlib.import_module("model_b")
    gl("attn")(a.Attention.forward)
    with pytest.warns(RuntimeWarning, match="model_b.Attention.forward"):
        gl("attn")(b.Attention.forward)
    gl.activate()
    a.Attention().forward(1)
    b.Attention().forward(1)
    assert gl.cache["Attention.forward"] == [1]
    assert gl.cache["model_b.Attention.forward"] == [10]


# -- scoped capture ------------------------------------------------------------


def test_capture_scope_collects_and_restores_even_on_error(gl):
    def f(x):
        y = x + 1
        return y

    gl("y")(f)
    with gl.capture() as cache:
        f(1)
    assert cache == {f.__qualname__: [2]}
    assert gl.is_activate is False and gl.cache == {}
    assert f(5) == 6 and gl.cache == {}

    gl.activate(max_entries=7)
    f(2)
    with pytest.raises(ZeroDivisionError):
        with gl.capture(max_entries=1):
            f(3)
            1 / 0
    assert gl.is_activate is True
    assert gl.policy.max_entries == 7
    assert gl.cache == {f.__qualname__: [3]}


# -- the cache: snapshots, threads, bounds, selection ---------------------------


def test_entries_are_snapshots(gl):
    @gl("buffer")
    def fill(n):
        buffer = np.zeros(n)
        buffer[:] = 1
        return buffer

    gl.activate()
    returned = fill(3)
    returned[:] = 7  # the caller changes the array after the call
    assert np.array_equal(gl.cache[fill.__qualname__][0], np.ones(3))


def call_from_threads(work, threads=8, calls=500):
    """work(i) for i in range(threads * calls), each thread calling its own run of i at once."""
    running = [
        threading.Thread(target=lambda start=start: [work(i) for i in range(start, start + calls)])
        for start in range(0, threads * calls, calls)
    ]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()


def test_threads_lose_nothing(gl):
    @gl("value")
    def work(i):
        value = i * 2
        return value

    gl.activate()
    call_from_threads(work)
    assert sorted(gl.cache[work.__qualname__]) == [i * 2 for i in range(4000)]


def test_bounded_cache_keeps_the_newest_and_counts_the_dropped(gl):
    @gl("value")
    def work(i):
        value = i
        return value

    gl.activate(max_entries=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(100):
            work(i)
    assert gl.cache[work.__qualname__] == [95, 96, 97, 98, 99]
    assert gl.dropped[work.__qualname__] == 95
    assert len([w for w in caught if "max_entries" in str(w.message)]) == 1


def test_bounded_cache_counts_exactly_when_threads_append_at_once(gl):
    @gl("value")
    def work(i):
        value = i
        return value

    gl.activate(max_entries=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        call_from_threads(work)
    kept = gl.cache[work.__qualname__]
    assert len(kept) == 100 and len(set(kept)) == 100
    assert gl.dropped == {work.__qualname__: 3900}
    # Each thread's own entries stay in its call order.
    for start in range(0, 4000, 500):
        mine = [v for v in kept if start <= v < start + 500]
        assert mine == sorted(mine)


def test_bounded_lists_read_like_lists_and_follow_the_bound(gl, tmp_path):
    @gl("value")
    def work(i):
        value = i
        return value

    gl.activate()
    for i in range(6):
        work(i)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gl.activate(max_entries=4)  # the list in place is bounded now: the 2 oldest go
        entries = gl.cache[work.__qualname__]
        assert entries == [2, 3, 4, 5] and [2, 3, 4, 5] == entries and entries != [5]
        assert gl.dropped == {work.__qualname__: 2}
        work(6)
    assert [str(w.message) for w in caught if "max_entries" in str(w.message)] != []
    assert entries[1:] == [4, 5, 6] and isinstance(entries[1:], list)
    assert entries[-1] == 6 and len(entries) == 4 and list(entries) == [3, 4, 5, 6]
    assert gl.dropped == {work.__qualname__: 3}
    save_cache(gl.cache, tmp_path / "bounded.npz")
    assert load_cache(tmp_path / "bounded.npz") == {work.__qualname__: [3, 4, 5, 6]}
    gl.activate()  # unbounded again: a plain list, drops counted so far kept
    assert type(gl.cache[work.__qualname__]) is list
    work(7)
    assert gl.cache[work.__qualname__] == [3, 4, 5, 6, 7]
    assert gl.dropped == {work.__qualname__: 3}
    gl.clear()
    assert gl.dropped == {} and gl.cache == {work.__qualname__: []}


def test_storage_options_are_keyword_only_and_is_active_names_the_switch(gl):
    # activate(True) used to mean keep_on_device=True without a word.
    with pytest.raises(TypeError):
        gl.activate(True)
    with pytest.raises(TypeError):
        with gl.capture(True):
            pass
    assert gl.is_active is False and gl.is_activate is False
    gl.activate(max_entries=3)
    assert gl.is_active is True and gl.is_activate is True


def test_select_is_applied_before_the_copy(gl):
    seen = []

    def first_row(attn):
        seen.append(attn.shape)
        return attn[0]

    @gl("attn", "other", select={"attn": first_row})
    def f(n):
        attn = np.arange(n * n, dtype=float).reshape(n, n)
        other = n
        return attn

    gl.activate()
    f(3)
    entry = gl.cache[f.__qualname__][0]
    assert seen == [(3, 3)]
    assert np.array_equal(entry["attn"], [0.0, 1.0, 2.0]) and entry["other"] == 3


def test_unbound_name_is_missing_and_warned_once(gl):
    @gl("maybe")
    def f(flag):
        if flag:
            maybe = 1
        return 0

    @gl("maybe", "other")
    def g(flag):
        other = 1
        if flag:
            maybe = 1
        return 0

    gl.activate()
    with pytest.warns(RuntimeWarning, match="'maybe' was not bound") as caught:
        f(False)
        g(False)
    # The warnings point at the captured functions, not at the library.
    assert [w.filename for w in caught] == [__file__, __file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(False)
        f(True)
    assert gl.cache[f.__qualname__] == [MISSING, MISSING, 1]


def test_save_load_round_trip_without_pickle(tmp_path):
    cache = {
        "Attention.forward": [np.random.rand(2, 3, 4).astype(np.float32), np.arange(5)],
        "Block.forward": [{"q": np.ones(2), "k": MISSING, "n": 3, "s": "text", "t": (1, [2.5])}],
        "empty": [],
    }
    path = tmp_path / "maps.npz"
    save_cache(cache, path)
    loaded = load_cache(path)
    assert list(loaded) == list(cache)
    for got, want in zip(loaded["Attention.forward"], cache["Attention.forward"]):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    entry = loaded["Block.forward"][0]
    assert np.array_equal(entry["q"], np.ones(2)) and entry["k"] is MISSING
    assert (entry["n"], entry["s"], entry["t"]) == (3, "text", (1, [2.5]))
    assert loaded["empty"] == []
    with np.load(path, allow_pickle=False) as archive:  # no object arrays inside
        assert all(archive[name].dtype != object for name in archive.files)


# -- errors ------------------------------------------------------------------------


def a_function(x):
    attn = x
    return attn


_ORIGINAL_A_FUNCTION_CODE = a_function.__code__


class AClass:
    pass


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda g: g("atn")(a_function), r"'atn' is not a local variable of a_function; "
                                         r"expected one of its locals: \['attn', 'x'\]"),
        (lambda g: g("attn")(len), r"can only instrument a Python function.*got "
                                   r"builtin_function_or_method"),
        (lambda g: g("attn")(AClass), r"got the class AClass; decorate the method"),
        (lambda g: g()(a_function), r"expected at least one variable name"),
        (lambda g: g(3)(a_function), r"variable names must be identifiers.*got 3 \(int\)"),
        (lambda g: g("attn", select=5), r"select must be a callable or a dict.*got 5"),
        (lambda g: g("attn", select={"q": abs}), r"select names \['q'\] that are not captured"),
        (lambda g: g.activate(max_entries=0), r"max_entries must be a positive int.*got 0"),
        (lambda g: g.activate(dtype="float99"), r"dtype must name.*got 'float99'"),
        (lambda g: g.activate(dtype="object"), r"dtype must name a dtype numpy and torch can "
                                               r"both store.*got 'object'"),
        (lambda g: g.activate(dtype="U10"), r"dtype must name.*got 'U10'"),
        (lambda g: g.activate(dtype="float128"), r"dtype must name.*got 'float128'"),
        (lambda g: g.activate(dtype=np.complex64), r"dtype must name.*complex64"),
        (lambda g: g.activate(dtype="bfloat16"), r"'bfloat16' cannot be stored in numpy"),
        (lambda g: g.activate(detach=False), r"detach=False keeps the autograd graph"),
        (lambda g: g.activate(keep_on_device="yes"), r"keep_on_device must be True or False"),
        (lambda g: setattr(g, "cache", []), r"get_local.cache must be a dict; got list"),
    ],
)
def test_errors_name_function_variable_expected_and_got(gl, call, message):
    with pytest.raises(VisualizerError, match=message):
        call(gl)


def test_numpy_dtype_objects_are_normalized(gl):
    gl.activate(dtype=np.float32)
    assert gl.policy.dtype == "float32"
    gl.activate(dtype=np.dtype("<f2"))
    assert gl.policy.dtype == "float16"


def test_select_failure_names_function_and_variable(gl):
    @gl("attn", select=lambda a: a[5])
    def f():
        attn = np.zeros((2, 2))
        return attn

    gl.activate()
    with pytest.raises(VisualizerError, match=r"select for 'attn' in .*f raised IndexError.*"
                                              r"shape \(2, 2\)"):
        f()


def test_save_rejects_what_needs_pickle(tmp_path):
    with pytest.raises(VisualizerError, match=r"cache\['f'\]\[0\] is a object; expected an array"):
        save_cache({"f": [object()]}, tmp_path / "x.npz")
    with pytest.raises(VisualizerError, match=r"object array, which needs pickle"):
        save_cache({"f": [np.array([None, 1])]}, tmp_path / "x.npz")


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.ones(2))
    with pytest.raises(VisualizerError, match="expected a file written by save_cache"):
        load_cache(path)


def test_importing_the_core_does_not_import_torch_or_matplotlib():
    script = "import sys, visualizer, visualizer.analysis; print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- the current code is the truth: %autoreload, editors, types.coroutine ----------------


def _version_one(x):
    attn = x + 1
    return attn


def _version_two(x):
    attn = x * 10
    return attn * 2


def test_code_replaced_before_activation_is_the_code_captured(gl):
    def f(x):
        attn = x + 1
        return attn

    gl("attn")(f)
    f.__code__ = _version_two.__code__  # what %autoreload does with an edited function
    gl.activate()
    assert f(3) == 60 and gl.cache[f.__qualname__] == [30]
    gl.deactivate()
    assert f.__code__ is _version_two.__code__ and f(3) == 60


def test_code_replaced_while_active_survives_deactivation(gl):
    def f(x):
        attn = x + 1
        return attn

    gl("attn")(f)
    gl.activate()
    assert f(1) == 2
    f.__code__ = _version_two.__code__
    gl.deactivate()
    assert f.__code__ is _version_two.__code__, "deactivate threw the edit away"
    gl.activate()
    assert f(1) == 20 and gl.cache[f.__qualname__] == [2, 10]


@pytest.mark.parametrize("active_when_decorated", [False, True])
def test_types_coroutine_above_get_local_in_either_state(gl, active_when_decorated):
    import asyncio
    import types

    if active_when_decorated:
        gl.activate()

    @types.coroutine
    @gl("attn")
    def tick(x):
        attn = x * 2
        yield
        return attn

    async def main(x):
        return await tick(x)

    for _ in range(2):
        gl.activate()
        assert asyncio.run(main(4)) == 8
        gl.deactivate()
        assert asyncio.run(main(5)) == 10, "deactivate left the function broken"
    assert gl.cache[tick.__qualname__] == [8, 8]


def test_ipython_autoreload_edit_is_captured(gl, module_dir):
    autoreload = pytest.importorskip("IPython.extensions.autoreload")
    name = module_dir("edited_model", """
        def forward(x):
            attn = x + 1
            return attn
    """)
    module = importlib.import_module(name)
    forward = module.forward
    gl("attn")(forward)
    new = {"__name__": name}
    exec("def forward(x):\n    attn = x * 100\n    return attn\n", new)
    autoreload.update_function(forward, new["forward"])  # IPython's own in-place update
    gl.activate()
    assert forward(2) == 200 and gl.cache[forward.__qualname__] == [200]
    gl.deactivate()
    assert forward(2) == 200


def test_capture_block_restores_the_entry_state_even_if_switched_inside(gl):
    gl("attn")(a_function)
    gl.activate()
    with gl.capture():
        gl.deactivate()
    assert gl.is_activate and a_function.__code__ is not _ORIGINAL_A_FUNCTION_CODE
    gl.deactivate()
    with gl.capture():
        gl.activate()
    assert not gl.is_activate and a_function.__code__ is _ORIGINAL_A_FUNCTION_CODE


def test_capture_blocks_in_two_threads_are_independent(gl):
    @gl("attn")
    def tagged(tag):
        attn = tag
        return attn

    process_cache = gl.cache
    inside = threading.Barrier(2)
    results = {}

    def worker(tag):
        with gl.capture() as cache:
            inside.wait()  # both blocks open at once
            for _ in range(50):
                tagged(tag)
            inside.wait()
        results[tag] = cache

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["a"][tagged.__qualname__] == ["a"] * 50
    assert results["b"][tagged.__qualname__] == ["b"] * 50
    assert gl.cache is process_cache and not gl.is_activate
    # A call in a thread with no block open goes to the process-wide cache.
    gl.activate()
    with gl.capture() as block:
        thread = threading.Thread(target=tagged, args=("elsewhere",))
        thread.start()
        thread.join()
        tagged("here")
    assert block[tagged.__qualname__] == ["here"]
    assert gl.cache[tagged.__qualname__] == ["elsewhere"]


def test_a_cell_deleted_by_a_nested_function_is_missing_not_an_error(gl):
    def outer():
        attn = 1

        def inner():
            nonlocal attn
            del attn

        inner()
        return 5

    gl("attn")(outer)
    gl.activate()
    with pytest.warns(RuntimeWarning, match="'attn' was not bound when .*outer returned"):
        assert outer() == 5  # as without capture: the function returns normally
    assert gl.cache[outer.__qualname__] == [MISSING]


def test_redecorating_nested_functions_with_new_selects_captures_every_call(gl):
    # That this runs in constant memory: tests/core/test_lifetime.py.
    gl.activate()

    def outer(i):
        @gl("attn", select=lambda value: value + 0)  # a new lambda on every call
        def inner():
            attn = i
            return attn

        return inner()

    for i in range(600):
        assert outer(i) == i
    assert gl.cache[outer.__qualname__ + ".<locals>.inner"] == list(range(600))


CLOUDPICKLE_SENDER = """
import sys
import cloudpickle
from visualizer import capture, get_local

# The form of instrumented code (tests/core/conftest.py): "globals" pickles the
# recorder as one of the function's globals.
capture._records_in_graphs = lambda: sys.argv[3] == "globals"

@get_local("attn")
def f(x):
    attn = x * 2
    return attn + 1

if sys.argv[2] == "on":
    get_local.activate()
with open(sys.argv[1], "wb") as file:
    cloudpickle.dump(f, file)  # by value: f lives in __main__
print(f(1), get_local.cache.get("f"))  # still captures here after pickling
"""

CLOUDPICKLE_RECEIVER = """
import pickle
import sys
from visualizer import get_local

with open(sys.argv[1], "rb") as file:
    f = pickle.load(file)
print(f(3), get_local.cache.get("f"))
"""


@pytest.mark.parametrize("form", ["constants", "globals"])
@pytest.mark.parametrize("capture", ["on", "off"])
def test_cloudpickle_of_a_decorated_main_function(tmp_path, capture, form):
    pytest.importorskip("cloudpickle")  # in the test extras; absent only on bare core venvs
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo}
    for name, source in (("sender.py", CLOUDPICKLE_SENDER), ("receiver.py", CLOUDPICKLE_RECEIVER)):
        (tmp_path / name).write_text(source)
    pickled = str(tmp_path / "f.pkl")
    sent = subprocess.run([sys.executable, str(tmp_path / "sender.py"), pickled, capture, form],
                          capture_output=True, text=True, env=env)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.split() == (["3", "[2]"] if capture == "on" else ["3", "None"])
    received = subprocess.run([sys.executable, str(tmp_path / "receiver.py"), pickled],
                              capture_output=True, text=True, env=env)
    assert received.returncode == 0, received.stderr
    # The function runs as it does undecorated; while capture was on it carries the
    # instrumented code, whose captures go to the receiving process's cache.
    assert received.stdout.split() == (["7", "[6]"] if capture == "on" else ["7", "None"])

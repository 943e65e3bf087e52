"""The fast path: immutable values of a one-name capture go to the cache's list without
entering the recorder (see visualizer.store.FastSink). Torch-free: runs on every Python.

The oracle for "without the recorder" is a profile function that sees every Python
call; the oracle for where values land is the list each step of the test expects.
"""
import sys
import threading
import warnings

import pytest

from visualizer.policy import StoragePolicy


def recorder_calls(function, *arguments):
    """How many times a get_local recorder ran during `function(*arguments)`."""
    seen = []

    def profile(frame, event, _argument):
        if event == "call" and frame.f_code.co_name in ("record", "record_several"):
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        function(*arguments)
    finally:
        sys.setprofile(None)
    return len(seen)


@pytest.fixture
def plus_one(gl):
    @gl("y")
    def plus_one(x):
        y = x + 1 if not isinstance(x, list) else x
        return y

    return plus_one


def test_immutable_values_skip_the_recorder_and_others_do_not(gl, plus_one):
    gl.activate()
    key = plus_one.__qualname__
    plus_one(0)  # the first call may set the list up through the recorder
    assert recorder_calls(plus_one, 1) == 0
    assert recorder_calls(plus_one, 2.5) == 0
    value = [1, 2]
    assert recorder_calls(plus_one, value) == 1  # a list is copied by the recorder
    value.append(3)
    assert recorder_calls(plus_one, True) == 0
    assert gl.cache[key] == [1, 2, 3.5, [1, 2], 2]
    assert type(gl.cache[key][-1]) is int  # True + 1, not a bool
    # A select=, or two names, never take the fast path.
    @gl("y", select=lambda y: y * 10)
    def selected(x):
        y = x
        return y

    @gl("y", "z")
    def two(x):
        y = z = x
        return y + z

    assert recorder_calls(selected, 1) == 1 and recorder_calls(two, 1) == 1
    assert gl.cache[selected.__qualname__] == [10]
    assert gl.cache[two.__qualname__] == [{"y": 1, "z": 1}]


def test_values_follow_every_change_of_the_cache(gl, plus_one):
    gl.activate()
    key = plus_one.__qualname__
    plus_one(0)
    held = gl.cache[key]
    gl.clear()
    plus_one(1)
    assert held == [1] and gl.cache[key] == [2]  # a list taken before clear() is kept

    gl.cache[key] = mine = []
    plus_one(2)
    assert mine == [3] and gl.cache[key] is mine
    del gl.cache[key]
    plus_one(3)
    assert mine == [3] and gl.cache[key] == [4]
    gl.cache.pop(key)
    plus_one(4)
    assert gl.cache[key] == [5]
    gl.cache.update({key: [0]})
    plus_one(5)
    assert gl.cache[key] == [0, 6]
    gl.cache |= {key: [10]}
    plus_one(6)
    assert gl.cache[key] == [10, 7]
    gl.cache.popitem()
    plus_one(7)
    assert gl.cache[key] == [8]
    gl.cache.setdefault(key, []).append(-1)
    plus_one(8)
    assert gl.cache[key] == [8, -1, 9]
    gl.cache.clear()
    plus_one(9)
    assert gl.cache == {key: [10]}
    gl.cache = {key: [100]}
    plus_one(10)
    assert gl.cache == {key: [100, 11]}
    gl.cache[key].clear()  # in place: the same list goes on receiving
    plus_one(11)
    assert gl.cache == {key: [12]}
    assert recorder_calls(plus_one, 12) == 0


def test_a_scope_open_in_one_thread_keeps_the_threads_apart(gl, plus_one):
    gl.activate()
    key = plus_one.__qualname__
    plus_one(0)
    opened, release, inside = threading.Event(), threading.Event(), {}

    def other_thread():
        with gl.capture() as cache:
            plus_one(100)
            opened.set()
            release.wait(10)
            plus_one(101)
            inside.update(cache)

    thread = threading.Thread(target=other_thread)
    thread.start()
    assert opened.wait(10)
    plus_one(1)  # the main thread still records into the process-wide cache
    release.set()
    thread.join(10)
    plus_one(2)
    assert inside == {key: [101, 102]}
    assert gl.cache[key] == [1, 2, 3]
    assert recorder_calls(plus_one, 3) == 0  # fast again once the block closed


def test_a_scope_in_this_thread_gets_its_values(gl, plus_one):
    gl.activate()
    key = plus_one.__qualname__
    plus_one(0)
    with gl.capture() as cache:
        plus_one(1)
    plus_one(2)
    assert cache == {key: [2]} and gl.cache[key] == [1, 3]


@pytest.mark.parametrize("read_dropped_midway", [False, True])
def test_bounded_fast_path_counts_and_warns_at_the_first_drop(gl, plus_one, read_dropped_midway):
    gl.activate(max_entries=5)
    key = plus_one.__qualname__
    warned_at = []
    for i in range(12):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plus_one(i)
        warned_at += [(i, w.filename) for w in caught if "max_entries" in str(w.message)]
        if read_dropped_midway and i in (2, 5, 8):
            gl.dropped  # reads the same counter the fast path ticks
    assert warned_at == [(5, __file__)]  # the sixth call drops the first entry
    assert gl.cache[key] == [8, 9, 10, 11, 12]
    assert gl.dropped == {key: 7}
    assert recorder_calls(plus_one, 12) == 0
    assert gl.dropped == {key: 8}


def test_a_bound_set_after_instrumenting_is_kept_and_counted(gl, plus_one):
    gl.activate()  # instrumented unbounded: its fast path does not count
    key = plus_one.__qualname__
    gl.store.policy = StoragePolicy(max_entries=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(10):
            plus_one(i)
    assert gl.cache[key] == [8, 9, 10] and gl.dropped == {key: 7}
    # Instrumented under a bound (it counts), then unbounded: nothing is counted.
    gl.activate(max_entries=3)
    gl.clear()
    gl.store.policy = StoragePolicy()
    for i in range(10):
        plus_one(i)
    assert gl.cache[key] == list(range(1, 11)) and gl.dropped == {}


def test_decorated_functions_sharing_a_key_share_the_list(gl):
    def make():
        @gl("y")
        def inner(x):
            y = x
            return y

        return inner

    first, second = make(), make()  # one qualified name
    gl.activate()
    first(1)
    second(2)
    first(3)
    assert gl.cache[first.__qualname__] == [1, 2, 3]

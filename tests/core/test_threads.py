"""Every public operation of get_local is thread-safe: decorating, activate/deactivate,
capture blocks, clear() and reading the cache, from 8 threads at once."""
import sys
import threading

import pytest


@pytest.fixture
def fast_switching():
    """Switch threads every microsecond, so that races show within a short test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def run_together(*works, repeat=1):
    """Run each work(index) in its own thread at once; the errors they raised."""
    errors = []
    start = threading.Barrier(len(works))

    def run(work, index):
        start.wait()
        try:
            for _ in range(repeat):
                work(index)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(work, i)) for i, work in enumerate(works)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _new_function(gl, name):
    """A new decorated function under a new key (a new cache key when called)."""
    def function(x):
        value = x + 1
        return value

    function.__qualname__ = name
    return gl("value")(function)


def test_clear_while_other_threads_add_keys(gl, fast_switching):
    gl.activate()
    for i in range(2000):  # many keys: clear() takes long enough to meet new ones
        _new_function(gl, f"existing_{i}")(i)

    def add_keys(thread):
        for i in range(300):
            _new_function(gl, f"new_{thread}_{i}")(i)

    def clear(_):
        for _ in range(30):
            gl.clear()

    errors = run_together(add_keys, add_keys, add_keys, clear, clear)
    assert errors == [], f"clear() racing new keys raised {errors[:3]}"
    assert gl.cache["new_0_299"] in ([], [300])


def test_overlapping_capture_blocks_in_two_threads_keep_their_captures(gl):
    function = _new_function(gl, "overlapped")
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    caches = {}

    def a():
        with gl.capture() as cache:
            a_entered.set()
            b_entered.wait()
            function(1)
        a_left.set()
        caches["a"] = cache

    def b():
        a_entered.wait()
        with gl.capture() as cache:
            b_entered.set()
            a_left.wait()  # a's block has closed; b's is still open
            function(2)
        caches["b"] = cache

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert caches["a"] == {"overlapped": [2]}
    assert caches["b"] == {"overlapped": [3]}, "b's call after a's block closed was lost"
    assert not gl.is_active, "capture stayed on after both blocks closed"
    function(5)
    assert gl.cache.get("overlapped", []) == []


def test_every_public_operation_from_eight_threads_at_once(gl, fast_switching):
    shared = _new_function(gl, "shared")
    results = {}

    def capturing(thread):
        for call in range(50):
            with gl.capture() as cache:
                shared(call)
                _new_function(gl, f"made_{thread}_{call}")(call)
            assert cache["shared"] == [call + 1], (thread, call, cache["shared"])
        results[thread] = True

    def switching(_):
        for _ in range(50):
            gl.activate()
            shared(0)
            gl.deactivate()

    def clearing_and_reading(_):
        for _ in range(50):
            gl.clear()
            list(gl.cache.get("shared", []))
            dict(gl.cache)
            dict(gl.dropped)

    errors = run_together(
        capturing, capturing, capturing, capturing, switching, switching,
        clearing_and_reading, clearing_and_reading,
    )
    assert errors == [], f"{len(errors)} errors, first: {errors[:1]!r}"
    assert sorted(results) == [0, 1, 2, 3]
    assert not gl.is_active, "capture stayed on after every switch and block was off"
    assert shared(1) == 2 and shared.__code__.co_name == "function"


def test_a_function_dying_in_another_thread_never_changes_a_registry_walk(gl):
    """The registry is walked (on every switch) under the lock, while any thread may drop
    the last reference to a decorated function at any moment. A weakref.WeakKeyDictionary
    deletes the dead entry from that thread at once, and a walk in progress elsewhere failed
    with "dictionary changed size during iteration" (CI, Python 3.9, the eight-thread test
    above; about 1 run in 30). Here a death while a walk holds the registry's lock only
    queues the entry, and the walk removes it as it lets go."""
    kept = _new_function(gl, "kept")
    dying = _new_function(gl, "dying")
    entries = gl._registrations._entries
    before = dict(entries)
    with gl._registrations._locked():  # as a walk holds it
        dropped = [dying]
        del dying

        def drop():
            dropped.clear()  # the last reference: the function dies in this thread

        thread = threading.Thread(target=drop)
        thread.start()
        thread.join()
        assert entries == before, "the dying function's entry changed the registry under the lock"
    assert len(entries) == 1, "the dead function's entry was kept after the walk let go"
    assert [function for function, _ in gl._registrations.items()] == [kept]

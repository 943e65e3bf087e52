"""Cleared entries' arrays are reused as copy destinations, never while a user holds them."""
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from visualizer.cache import BUFFERS  # noqa: E402


@pytest.fixture
def doubled(gl):
    @gl("attn")
    def forward(x):
        attn = x * 2
        return attn

    gl.activate()
    yield forward
    gl.deactivate()


def maps(seed):
    return torch.randn(4, 6, 200, 200, generator=torch.Generator().manual_seed(seed))  # 3.7 MiB


def test_a_cleared_entry_is_the_next_copy_s_destination_with_the_new_values(gl, doubled):
    doubled(maps(0))
    first_id = id(gl.cache[doubled.__qualname__][0])
    gl.clear()
    doubled(maps(1))
    (entry,) = gl.cache[doubled.__qualname__]
    assert id(entry) == first_id  # the same array object, warm memory
    np.testing.assert_array_equal(entry, (maps(1) * 2).numpy())


@pytest.mark.parametrize("hold", [
    lambda entry: entry,                       # the array itself
    lambda entry: entry[1:],                   # a view of it
    lambda entry: torch.from_numpy(entry),     # a tensor sharing its memory
])
def test_an_entry_a_user_still_holds_is_never_written(gl, doubled, hold):
    doubled(maps(0))
    held = hold(gl.cache[doubled.__qualname__][0])
    expected = np.asarray(held).copy()
    gl.clear()
    doubled(maps(1))
    np.testing.assert_array_equal(np.asarray(held), expected)
    assert not np.shares_memory(np.asarray(held), gl.cache[doubled.__qualname__][0])


@pytest.mark.parametrize("bound", [None, 5])
def test_a_list_a_user_took_before_clear_keeps_its_contents(gl, doubled, bound):
    gl.activate(max_entries=bound)
    doubled(maps(0))
    held = gl.cache[doubled.__qualname__]  # the list, not its arrays
    gl.clear()
    doubled(maps(1))
    np.testing.assert_array_equal(held[0], (maps(0) * 2).numpy())
    assert not np.shares_memory(held[0], gl.cache[doubled.__qualname__][0])


@pytest.fixture
def two_names(gl):
    """A function capturing two names: entries are dicts of two arrays."""
    @gl("attn", "scores")
    def forward(x):
        scores = x + 1  # noqa: F841 - captured
        attn = x * 2
        return attn

    yield forward
    gl.deactivate()


def test_an_entry_of_several_names_a_user_holds_keeps_its_arrays(gl, two_names):
    forward = two_names
    gl.activate()
    forward(maps(0))
    held = gl.cache[forward.__qualname__][0]  # the dict of one call
    gl.clear()
    forward(maps(1))
    np.testing.assert_array_equal(held["attn"], (maps(0) * 2).numpy())
    np.testing.assert_array_equal(held["scores"], (maps(0) + 1).numpy())


def test_several_names_dtype_policy_and_shapes_are_matched(gl, two_names):
    forward = two_names
    gl.activate(dtype="float16")
    forward(maps(0))
    gl.clear()
    forward(maps(1)[:, :, :100])  # another shape: fresh arrays, no mix-up
    forward(maps(2))
    entries = gl.cache[forward.__qualname__]
    assert entries[0]["attn"].shape == (4, 6, 100, 200)
    np.testing.assert_array_equal(entries[1]["attn"], (maps(2) * 2).numpy().astype(np.float16))
    np.testing.assert_array_equal(entries[1]["scores"], (maps(2) + 1).numpy().astype(np.float16))


def test_switching_capture_off_lets_go_of_the_pool(gl, doubled):
    doubled(maps(0))
    gl.clear()
    assert BUFFERS._free  # one array waits for the next copy
    gl.deactivate()
    assert not BUFFERS._free


def test_a_clear_while_capture_is_off_frees_the_arrays(gl, doubled):
    doubled(maps(0))
    gl.deactivate()
    entry = weakref.ref(gl.cache[doubled.__qualname__][0])
    gl.clear()  # nothing will copy into them: they go, not to the pool
    assert not BUFFERS._free
    assert entry() is None


def test_the_pool_holds_at_most_one_clear_s_worth(gl, doubled):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(3):
            doubled(maps(seed))
        gl.clear()  # three arrays wait
        gl.clear()  # nothing was copied in between: the three go, none come
    assert not BUFFERS._free

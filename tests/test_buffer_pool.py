"""Cleared entries' arrays are reused as copy destinations, never while a user holds them."""
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from visualizer._pool import BUFFERS  # noqa: E402


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
    assert BUFFERS.free_count()  # one array waits for the next copy
    gl.deactivate()
    assert not BUFFERS.free_count()


def test_a_clear_while_capture_is_off_frees_the_arrays(gl, doubled):
    doubled(maps(0))
    gl.deactivate()
    entry = weakref.ref(gl.cache[doubled.__qualname__][0])
    gl.clear()  # nothing will copy into them: they go, not to the pool
    assert not BUFFERS.free_count()
    assert entry() is None


def test_the_pool_holds_at_most_one_clear_s_worth(gl, doubled):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(3):
            doubled(maps(seed))
        gl.clear()  # three arrays wait
        gl.clear()  # nothing was copied in between: the three go, none come
    assert not BUFFERS.free_count()


# -- tensors kept on the CPU: keep_on_device=True ------------------------------


def backing(entry):
    """A weak reference to the array under an entry's memory: alive while the pool keeps it.

    (Addresses are no proof of reuse: freed memory often comes back at the same address.)
    """
    if isinstance(entry, np.ndarray):
        return weakref.ref(entry)
    return weakref.ref(BUFFERS.array_of(entry))  # the array lend() copied into


def reused(entry, memory):
    return memory() is not None and np.shares_memory(np.asarray(entry), memory())


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_a_cleared_cpu_tensor_s_memory_is_the_next_copy_s_destination(gl, doubled, dtype):
    gl.activate(keep_on_device=True, dtype=dtype)
    doubled(maps(0))
    memory = backing(gl.cache[doubled.__qualname__][0])
    gl.clear()
    doubled(maps(1))
    (entry,) = gl.cache[doubled.__qualname__]
    assert isinstance(entry, torch.Tensor) and reused(entry, memory)  # warm memory
    expected = maps(1) * 2
    if dtype is not None:
        expected = expected.to(torch.float16)
    assert entry.dtype == expected.dtype and not entry.requires_grad
    assert torch.equal(entry, expected)


@pytest.mark.parametrize("hold", [
    lambda entry: entry,                       # the tensor itself
    lambda entry: entry[1:],                   # a view of it (no Python reference to it)
    lambda entry: entry.numpy(),               # an array sharing its memory
    lambda entry: entry.untyped_storage(),     # its storage
])
def test_a_cpu_tensor_a_user_still_holds_is_never_written(gl, doubled, hold):
    gl.activate(keep_on_device=True)
    doubled(maps(0))
    held = hold(gl.cache[doubled.__qualname__][0])
    memory = backing(gl.cache[doubled.__qualname__][0])
    expected = (maps(0) * 2).flatten()
    gl.clear()
    doubled(maps(1))
    doubled(maps(2))  # a second copy of the same shape: the pool has nothing for it either
    assert not any(reused(entry, memory) for entry in gl.cache[doubled.__qualname__])
    as_tensor = torch.as_tensor(held) if not isinstance(held, torch.UntypedStorage) else (
        torch.tensor([], dtype=torch.float32).set_(held))
    assert torch.equal(as_tensor.flatten(), expected[-as_tensor.numel():])


def test_small_strided_and_bfloat16_tensors_are_plain_copies(gl, doubled):
    gl.activate(keep_on_device=True)
    small = torch.randn(4, 4)
    strided = maps(0).transpose(-1, -2)  # a clone keeps its strides
    doubled(small)
    doubled(strided)
    gl.activate(keep_on_device=True, dtype="bfloat16")
    doubled(maps(0))
    entries = gl.cache[doubled.__qualname__]
    assert torch.equal(entries[0], small * 2)
    assert entries[1].stride() == strided.stride() and torch.equal(entries[1], strided * 2)
    assert entries[2].dtype == torch.bfloat16
    assert all(BUFFERS.array_of(entry) is None for entry in entries)  # none lent by the pool


def test_a_lent_tensor_that_dies_without_clear_leaves_nothing_behind(gl, doubled):
    gl.activate(keep_on_device=True, max_entries=1)
    before = BUFFERS.lent_count()  # tensors of other tests that are not collected yet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(3):
            doubled(maps(seed))  # the bound drops the older tensors
    (last,) = gl.cache[doubled.__qualname__]
    assert BUFFERS.lent_count() - before == 1 and BUFFERS.array_of(last) is not None
    assert torch.equal(gl.cache[doubled.__qualname__][0], maps(2) * 2)


# -- capture_attention's maps: AttentionMaps.clear() ----------------------------


class SoftmaxAttention(torch.nn.Module):
    """The explicit softmax of timm's Attention, on given scores."""

    def forward(self, scores):
        return scores.softmax(-1) * 1.0


@pytest.mark.parametrize("keep_on_device", [False, True])
def test_attention_maps_clear_recycles_while_recording(keep_on_device):
    from visualizer import capture_attention

    module = SoftmaxAttention()
    recorder = capture_attention(module, keep_on_device=keep_on_device)

    with recorder as recorded:
        module(maps(0))
        first = backing(recorded[""][0])
        held = recorded[""]  # a list taken before clear() keeps its map
        recorded.clear()
        module(maps(1))
        assert held[0] is not recorded[""][0]
        module(maps(2))
        del held
        recorded.clear()
        module(maps(3))
        (entry,) = recorded[""]
        assert not reused(entry, first)  # the held list's map was not reused...
        np.testing.assert_array_equal(np.asarray(entry), maps(3).softmax(-1).numpy())
        third = backing(entry)
        del entry
        recorded.clear()
        module(maps(4))
        (entry,) = recorded[""]  # ...but the next clear() hands its memory on
        np.testing.assert_array_equal(np.asarray(entry), maps(4).softmax(-1).numpy())
        assert reused(entry, third)
        del entry
    assert not BUFFERS.free_count()  # stopping lets go of the pool
    last = weakref.ref(recorder.maps[""][0])
    recorder.maps.clear()  # not recording: frees, pools nothing
    assert last() is None and not BUFFERS.free_count()


# -- maps the fused path computes (sdpa_capture): computed into pooled memory ----


def fused_attention(query):
    return torch.nn.functional.scaled_dot_product_attention(query, query, query)


def weights_by_hand(query):
    return (query @ query.transpose(-2, -1) / query.shape[-1] ** 0.5).softmax(-1)


@pytest.mark.parametrize("keep_on_device", [False, True])
def test_fused_maps_are_computed_into_cleared_maps_memory(keep_on_device):
    from visualizer import get_local
    from visualizer.fused import sdpa_capture

    key = fused_attention.__qualname__
    with sdpa_capture.capture(keep_on_device=keep_on_device) as cache:
        fused_attention(maps(0))
        memory = backing(cache[key][0])
        for seed in range(1, 4):  # every round the same memory: no chain of wrappers grows
            get_local.clear()
            fused_attention(maps(seed))
            (entry,) = cache[key]
            assert reused(entry, memory)
            if not keep_on_device:
                assert entry is memory()  # the array itself, not a view of a view of it
            np.testing.assert_allclose(
                np.asarray(entry), weights_by_hand(maps(seed)).numpy(), atol=1e-6)
            del entry
        held = cache[key][0][0]  # a view: its memory must not be computed into
        get_local.clear()
        fused_attention(maps(9))
        assert not reused(cache[key][0], memory)
        np.testing.assert_allclose(np.asarray(held), weights_by_hand(maps(3))[0].numpy(),
                                   atol=1e-6)
        get_local.clear()
        assert BUFFERS.free_count()
    assert not BUFFERS.free_count()  # the block was the last capture: the pool lets go


def test_a_copy_of_recording_maps_frees_what_it_clears():
    import copy
    import pickle

    from visualizer import capture_attention

    module = SoftmaxAttention()
    with capture_attention(module) as recorded:
        module(maps(0))
        for duplicate in (copy.deepcopy(recorded), pickle.loads(pickle.dumps(recorded))):
            last = weakref.ref(duplicate[""][0])
            duplicate.clear()  # no recorder fills the copy: nothing to recycle for
            assert last() is None
        recorded.clear()
        assert BUFFERS.free_count()  # the recorder's own maps do recycle


def test_maps_cleared_before_stop_are_not_reported_as_nothing_captured():
    from visualizer import capture_attention

    module = SoftmaxAttention()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with capture_attention(module) as recorded:
            module(maps(0))
            recorded.clear()  # looked at, then cleared: the loop's last step
    identity = torch.nn.Identity()
    with pytest.warns(RuntimeWarning, match="no attention was captured"):
        with capture_attention(identity):
            identity(maps(0))  # ran, nothing recorded: still said


def test_a_recorder_that_stops_leaves_get_local_s_pool_alone():
    from visualizer import capture_attention, get_local

    @get_local("attn")
    def doubled(x):
        attn = x * 2
        return attn

    get_local.activate()
    try:
        doubled(maps(0))
        get_local.clear()  # capture is on: the array waits in the pool for the next copy
        module = SoftmaxAttention()
        with capture_attention(module):
            module(maps(1))
        assert BUFFERS.held  # get_local still copies into it: the recorder's stop kept it
    finally:
        get_local.deactivate()
        get_local.clear()
    assert not BUFFERS.free_count()


def test_multihead_attention_maps_in_a_loop_reuse_memory_and_equal_torch_s_weights():
    from visualizer import capture_attention

    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(64, 4).eval()  # torch's defaults: (L, N, E) inputs
    inputs = [torch.randn(300, 2, 64) for _ in range(3)]  # maps of 2.7 MiB: the pooled path
    with torch.no_grad():
        expected = [module(x, x, x, average_attn_weights=False)[1] for x in inputs]
    with torch.no_grad(), capture_attention(module) as recorded:
        memory = None
        for x, weights in zip(inputs, expected):
            module(x, x, x)
            (entry,) = recorded[""]
            if memory is not None:
                assert reused(entry, memory)
            memory = backing(entry)
            np.testing.assert_allclose(entry, weights.numpy(), atol=1e-6)
            del entry
            recorded.clear()

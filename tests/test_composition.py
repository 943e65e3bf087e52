"""Two capture mechanisms on one forward, and nesting: one entry per call per key.

Whatever else records, each recorder's key holds one entry per call of what it
watches: get_local's per decorated call, sdpa_capture's per SDPA call,
capture_attention's per attention module call. Oracles: values computed by
hand from the module's weights, and nn.MultiheadAttention's own weights.
"""
import gc
import math
import threading
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from visualizer import MISSING, capture_attention, get_local, sdpa_capture  # noqa: E402
from visualizer.fused import SdpaCapture  # noqa: E402

HEADS, TOKENS, DIM = 2, 5, 8


class FusedAttention(nn.Module):
    """timm's attention on its fused path, with q (and optionally the output) decorated."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def split(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], TOKENS, 3, HEADS, DIM // HEADS).permute(
            2, 0, 3, 1, 4
        )
        return q, k, v

    @get_local("q")
    def forward(self, x):
        q, k, v = self.split(x)
        return F.scaled_dot_product_attention(q, k, v)


class OutputDecorated(FusedAttention):
    @get_local("out")
    def forward(self, x):
        q, k, v = self.split(x)
        out = F.scaled_dot_product_attention(q, k, v)  # bound only after the SDPA call
        return out


class Unbound(FusedAttention):
    fused = True

    @get_local("attn")
    def forward(self, x):  # the fused path: attn is never formed
        q, k, v = self.split(x)
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS)).softmax(-1)
        return attn @ v


class Raising(FusedAttention):
    @get_local("attn")
    def forward(self, x):
        q, k, v = self.split(x)
        attn = F.scaled_dot_product_attention(q, k, v)
        raise ValueError("after the SDPA call")
        return attn  # noqa: unreachable, but makes attn a local


def by_hand(module, x):
    """(q, softmax(q kᵀ / sqrt(d))) from the module's weights."""
    with torch.no_grad():
        q, k, _ = module.split(x)
        return q, (q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS)).softmax(-1)


pytestmark = pytest.mark.usefixtures("capture_left_off")


def inputs(calls):
    torch.manual_seed(0)
    return [torch.randn(1, TOKENS, DIM) for _ in range(calls)]


def test_get_local_bound_name_and_sdpa_weights_of_one_forward_go_under_two_keys():
    module = FusedAttention()
    xs = inputs(3)
    key = get_local.key_of(FusedAttention.forward)
    with pytest.warns(RuntimeWarning, match=f"go under '{key}:sdpa'"):
        with get_local.capture(), sdpa_capture.capture() as cache:
            for x in xs:
                module(x)
    assert len(cache[key]) == len(cache[f"{key}:sdpa"]) == 3
    for x, q, weights in zip(xs, cache[key], cache[f"{key}:sdpa"]):
        want_q, want_weights = by_hand(module, x)
        np.testing.assert_allclose(q, want_q.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(weights, want_weights.numpy(), rtol=1e-5, atol=1e-6)


def test_a_name_bound_after_the_sdpa_call_still_gives_one_entry_per_call_per_key():
    module = OutputDecorated()
    xs = inputs(2)
    key = get_local.key_of(OutputDecorated.forward)
    with pytest.warns(RuntimeWarning, match="one entry per call per key"):
        with get_local.capture(), sdpa_capture.capture() as cache:
            outputs = [module(x) for x in xs]
    assert len(cache[key]) == len(cache[f"{key}:sdpa"]) == 2
    for out, entry in zip(outputs, cache[key]):
        np.testing.assert_array_equal(entry, out.detach().numpy())


def test_unbound_names_have_the_sdpa_weights_as_their_one_entry_without_a_warning():
    module = Unbound()
    xs = inputs(3)
    key = get_local.key_of(Unbound.forward)
    with get_local.capture(), sdpa_capture.capture() as cache:  # warnings are errors here
        for x in xs:
            module(x)
    assert list(cache) == [key]
    for x, weights in zip(xs, cache[key]):
        np.testing.assert_allclose(weights, by_hand(module, x)[1].numpy(), rtol=1e-5, atol=1e-6)


@get_local("z")
def early(flag):
    if flag:
        return 0
    z = 2
    return z


def test_an_unrelated_early_return_while_sdpa_capture_is_on_records_missing():
    with pytest.warns(RuntimeWarning, match="'z' was not bound when early returned"):
        with get_local.capture(), sdpa_capture.capture() as cache:
            results = [early(flag) for flag in (True, False, True)]
    assert results == [0, 2, 0]
    assert cache["early"] == [MISSING, 2, MISSING]


def test_a_decorated_call_that_raises_records_nothing_and_holds_nothing():
    module = Raising()
    x = inputs(1)[0]
    key = get_local.key_of(Raising.forward)
    with get_local.capture(), sdpa_capture.capture() as cache:
        with pytest.raises(ValueError, match="after the SDPA call"):
            module(x)
        # The next SDPA call of another function still records where it should.
        F.scaled_dot_product_attention(*(torch.randn(1, 1, 3, 4),) * 3)
    assert key not in cache
    assert len(cache["test_a_decorated_call_that_raises_records_nothing_and_holds_nothing"]) == 1
    assert get_local.store.held_calls == 0


def test_held_weights_keep_no_frame_alive_after_the_block():
    """The frame of a call that raised after its SDPA call (its locals: the user's tensors)."""
    module = Raising()
    x = inputs(1)[0]
    alive = weakref.ref(x)
    with get_local.capture(), sdpa_capture.capture():
        try:
            module(x)
        except ValueError:
            pass
        del x
    gc.collect()
    assert alive() is None
    assert get_local.store.held_calls == 0


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def own_weights(model, x):
    with torch.no_grad():
        return model.attention(x, x, x, need_weights=True, average_attn_weights=False)[1]


def test_nested_capture_attention_blocks_count_each_call_once():
    torch.manual_seed(0)
    model = Model().eval()
    xs = inputs(3)
    with capture_attention(model) as outer:
        model(xs[0])
        with capture_attention(model) as inner:
            model(xs[1])
        model(xs[2])
    assert list(outer) == ["attention"] and list(inner) == ["attention"]
    assert len(outer["attention"]) == 3 and len(inner["attention"]) == 1
    for x, got in zip(xs, outer["attention"]):
        np.testing.assert_allclose(got, own_weights(model, x).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(inner["attention"][0], outer["attention"][1])


def test_sdpa_capture_and_capture_attention_on_one_forward_each_record_one_map_per_call():
    module = Unbound()
    xs = inputs(2)
    key = get_local.key_of(Unbound.forward)
    with sdpa_capture.capture() as cache, capture_attention(module) as maps:
        for x in xs:
            module(x)
    assert list(maps) == [""] and len(maps[""]) == 2
    assert list(cache) == [key] and len(cache[key]) == 2
    for x, from_maps, from_sdpa in zip(xs, maps[""], cache[key]):
        want = by_hand(module, x)[1].numpy()
        np.testing.assert_allclose(from_maps, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(from_sdpa, want, rtol=1e-5, atol=1e-6)


def test_threads_each_settle_their_own_calls():
    module = Unbound()
    key = get_local.key_of(Unbound.forward)
    torch.manual_seed(1)
    xs = [[torch.randn(1, TOKENS, DIM) for _ in range(4)] for _ in range(4)]
    results = {}

    def worker(index):
        with get_local.capture(), sdpa_capture.capture() as cache:
            for x in xs[index]:
                module(x)
        results[index] = cache[key]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 1, 2, 3]
    for index, entries in results.items():
        assert len(entries) == 4
        for x, got in zip(xs[index], entries):
            want = by_hand(module, x)[1].numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert get_local.store.held_calls == 0


# -- torch.func transforms -----------------------------------------------------


TRANSFORMS = {
    "grad": lambda f: torch.func.grad(lambda q: f(q).sum()),
    "vmap": torch.func.vmap,
    "jacrev": torch.func.jacrev,
}


class SelfAttention(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


# jacrev batches SDPA's backward through torch's slow fallback, and says so.
SLOW_FALLBACK = "ignore:There is a performance drop:UserWarning"


@pytest.mark.filterwarnings(SLOW_FALLBACK)
@pytest.mark.parametrize("keep_on_device", [False, True])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_sdpa_capture_under_a_transform_leaves_the_call_alone_and_says_so(
    transform, keep_on_device
):
    module = SelfAttention()
    q = torch.randn(2, HEADS, 3, 4)
    want = TRANSFORMS[transform](module)(q)
    fresh = SdpaCapture(get_local)  # its warnings are said once per recorder and function
    with pytest.warns(RuntimeWarning, match="sdpa_capture: .* under a torch.func transform"):
        with fresh.capture(keep_on_device=keep_on_device) as cache:
            got = TRANSFORMS[transform](module)(q)
            module(q)  # a plain call in the same block still records
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (entries,) = cache.values()
    assert len(entries) == 1
    expected = (q @ q.transpose(-2, -1) / 2).softmax(-1)
    np.testing.assert_allclose(np.asarray(torch.as_tensor(entries[0]).cpu()), expected.numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings(SLOW_FALLBACK)
@pytest.mark.parametrize("keep_on_device", [False, True])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_capture_attention_under_a_transform_leaves_the_call_alone_and_says_so(
    transform, keep_on_device
):
    module = SelfAttention()
    q = torch.randn(2, HEADS, 3, 4)
    want = TRANSFORMS[transform](module)(q)
    with pytest.warns(RuntimeWarning, match="capture_attention: module '' ran under a torch.func"):
        with capture_attention(module, keep_on_device=keep_on_device) as maps:
            got = TRANSFORMS[transform](module)(q)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert dict(maps) == {}

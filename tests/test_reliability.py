"""Reliability with torch: nothing leaks, nothing breaks the user's call.

- A model whose forward makes a decorated helper per call frees each helper and
  the activation it closes over; repeated captures run in constant memory.
- Under warnings-as-errors, a warning said during the model's call is raised at
  the next handover point, never inside the call: the output and the entries
  are those of a run without the filter.
- Empty attention (no keys, a head dim of 0) captures like the plain call runs.
- capture_attention started and stopped from 8 threads at once.
- Pickled AttentionMaps load where this package is not installed.
(The torch-free parts: tests/core/test_lifetime.py, test_threads.py,
test_handover.py, test_portable.py.)
"""
import gc
import pickle
import threading
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from visualizer import capture_attention, get_local  # noqa: E402
from visualizer.fused import sdpa_capture  # noqa: E402

from .core.isolation import defined, shape_loaded_elsewhere, traced_growth  # noqa: E402


pytestmark = pytest.mark.usefixtures("capture_left_off")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


class SdpaAttention(nn.Module):
    """SDPA attention over (B, H, N, E) inputs, with dropout while training."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v):
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)


class Blocks(nn.Module):
    def __init__(self, depth=2, dropout=0.0):
        super().__init__()
        self.blocks = nn.ModuleList(SdpaAttention(dropout) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x, x, x)
        return x


def inputs(seed=0, shape=(1, 2, 5, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- 1. nothing leaks ---------------------------------------------------------


@pytest.mark.parametrize("active", [False, True], ids=["off", "on"])
def test_a_forward_that_makes_a_decorated_helper_frees_it_and_its_activation(active):
    kept, codes = [], []
    namespace = defined(
        """
        class WithHelper(nn.Module):
            def forward(self, x):
                activation = x * 2  # what the helper closes over

                @get_local("attn")
                def helper():
                    attn = activation.softmax(-1)
                    return attn

                kept.extend([weakref.ref(helper), weakref.ref(activation)])
                codes.append(weakref.ref(helper.__code__))
                return helper()
        """,
        nn=nn, get_local=get_local, kept=kept, codes=codes, weakref=weakref,
    )
    model = namespace["WithHelper"]()
    if active:
        get_local.activate()
    for seed in range(20):
        model(inputs(seed, (1, 2, 64, 64)))
    gc.collect()
    assert [ref for ref in kept if ref() is not None] == []
    if active:
        assert len(get_local.cache["WithHelper.forward.<locals>.helper"]) == 20
        get_local.clear()
    del namespace, model
    gc.collect()
    assert [ref for ref in codes if ref() is not None] == [], "instrumented code outlived its model"


def test_a_thousand_capture_clear_cycles_of_a_model_run_in_constant_memory():
    model = Blocks()
    x = inputs()

    def cycles(count):
        for _ in range(count):
            with capture_attention(model) as maps:
                model(x)
            assert [len(calls) for calls in maps.values()] == [1, 1]
            maps.clear()
            with get_local.capture(), sdpa_capture.capture() as cache:
                model(x)
            assert [len(calls) for calls in cache.values()] == [2]
            get_local.clear()

    cycles(50)
    gc.collect()
    objects = len(gc.get_objects())
    grown = traced_growth(lambda: cycles(1000))
    assert grown < 256 * 1024, f"1,000 capture/clear cycles kept {grown} bytes"
    assert len(gc.get_objects()) - objects < 500


# -- 2. the user's call never fails because capture is on ---------------------


def test_dropout_in_a_recorded_sdpa_call_never_fails_the_call(warnings_are_errors):
    model = Blocks(dropout=0.5).train()
    x = inputs()
    torch.manual_seed(1)
    plain = model(x)
    torch.manual_seed(1)
    with pytest.raises(RuntimeWarning, match="dropout_p=0.5"):
        with sdpa_capture.capture() as cache:
            captured = model(x)  # the call returns: the notice waits for the block's exit
    assert torch.equal(captured, plain)
    assert [len(calls) for calls in cache.values()] == [2]  # one entry per call


def test_two_functions_with_one_name_calling_sdpa_never_fail_the_call(
    module_dir, warnings_are_errors
):
    import importlib

    source = """
        import torch.nn.functional as F

        def attend(x):
            return F.scaled_dot_product_attention(x, x, x)
        """
    first = importlib.import_module(module_dir("sdpa_caller_a", source))
    second = importlib.import_module(module_dir("sdpa_caller_b", source))
    x = inputs()
    with pytest.raises(RuntimeWarning, match="'sdpa_caller_b.attend'"):
        with sdpa_capture.capture() as cache:
            outputs = [first.attend(x), second.attend(x)]
    assert all(torch.equal(out, F.scaled_dot_product_attention(x, x, x)) for out in outputs)
    assert {key: len(calls) for key, calls in cache.items()} == {
        "attend": 1, "sdpa_caller_b.attend": 1,
    }


EMPTY = {
    "no keys": ((1, 2, 3, 4), (1, 2, 0, 4)),
    "no queries": ((1, 2, 0, 4), (1, 2, 5, 4)),
    "head dim 0": ((1, 2, 3, 0), (1, 2, 5, 0)),
}


@pytest.mark.parametrize(
    "case, how",
    [(case, how) for case in EMPTY for how in ("sdpa_capture", "capture_attention", "rows=0")],
)
def test_empty_attention_captures_like_the_plain_call_runs(case, how):
    query_shape, key_shape = EMPTY[case]
    q, k = torch.randn(query_shape), torch.randn(key_shape)
    v = torch.randn(key_shape[:-1] + (4,))
    model = SdpaAttention()
    plain = model(q, k, v)
    if how == "capture_attention":
        with capture_attention(model) as maps:
            captured = model(q, k, v)
        (entry,) = maps[""]
    else:
        with sdpa_capture.capture(rows=0 if how == "rows=0" else None) as cache:
            captured = model(q, k, v)
        (entry,) = cache["SdpaAttention.forward"]
    assert torch.equal(captured, plain)
    rows = min(1, query_shape[-2]) if how == "rows=0" else query_shape[-2]
    assert entry.shape == (1, 2, rows, key_shape[-2])
    # The oracle: softmax of the scores computed by hand (0 keys: nothing; head dim 0: uniform).
    if rows and key_shape[-2]:
        scores = q[..., :rows, :] @ k.transpose(-2, -1)
        if query_shape[-1]:
            scores = scores / query_shape[-1] ** 0.5
        np.testing.assert_allclose(entry, scores.softmax(-1).numpy(), atol=1e-6)


# -- 3. thread-safe -----------------------------------------------------------


def test_capture_attention_started_and_stopped_from_eight_threads_at_once():
    x = inputs()
    models = [Blocks() for _ in range(8)]
    plain = [model(x) for model in models]
    errors, counts = [], {}
    start = threading.Barrier(8)

    def work(index):
        model = models[index]
        try:
            start.wait()
            for _ in range(20):
                with capture_attention(model) as maps:
                    out = model(x)
                assert torch.equal(out, plain[index])
                counts.setdefault(index, []).append(
                    {path: len(calls) for path, calls in maps.items()}
                )
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [], f"{len(errors)} errors, first: {errors[:1]!r}"
    for index in range(8):
        assert counts[index] == [{"blocks.0": 1, "blocks.1": 1}] * 20, index
    assert get_local.store.fused_recorders == 0
    for model in models:
        assert all(
            not module._forward_hooks and not module._forward_pre_hooks
            for module in model.modules()
        )
        assert torch.equal(model(x), plain[0] if model is models[0] else model(x))


# -- 8. a drop-in for the original ----------------------------------------------


def test_pickled_attention_maps_load_as_a_plain_dict_without_the_package(tmp_path):
    model = Blocks()
    with capture_attention(model, max_entries=1) as maps:
        model(inputs())
    array = "numpy.ndarray"
    assert shape_loaded_elsewhere(tmp_path, maps) == {
        "dict": {"blocks.0": {"list": [array]}, "blocks.1": {"list": [array]}}
    }
    loaded = pickle.loads(pickle.dumps(maps))
    assert type(loaded) is dict and type(loaded["blocks.1"]) is list
    np.testing.assert_array_equal(loaded["blocks.1"][0], maps["blocks.1"][0])

"""Every way out of a capture leaves the process as it found it.

Capture changes process-wide state: forward hooks and instance `forward`
wrappers on the model's modules, TorchFunctionModes on torch's mode stack,
Dynamo's stance, get_local's and sdpa_capture's switches and the code of
decorated functions. Each test takes one way out — a normal exit, an exception
or a KeyboardInterrupt (a notebook's stop button) raised in the model, inside
the library's own recording or half way through `start()`, recorders stopped
in another order than they started, several threads — and checks every piece
of that state against a snapshot taken before, and the model's next output
against a twin that was never captured (bitwise).
"""

import copy
import threading
import warnings

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import torch._dynamo  # noqa: E402,F401  (loaded: recorders then set Dynamo's stance)
from examples.toy_vit import VisionTransformer  # noqa: E402
from visualizer import AttentionRecorder, capture_attention, get_local  # noqa: E402
from visualizer import attention as attention_module  # noqa: E402
from visualizer.fused import sdpa_capture  # noqa: E402


def dynamo_stance():
    """Dynamo's current stance name, or None where torch has none (or Dynamo is not loaded)."""
    import sys

    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    stance = getattr(eval_frame, "_stance", None)
    return getattr(stance, "stance", None)


def process_state(*models):
    """Everything capture may change, as comparable values."""
    modules = [(index, name, module) for index, model in enumerate(models)
               for name, module in model.named_modules()]
    return {
        "hooks": {
            (index, name): (
                len(module._forward_hooks),
                len(module._forward_pre_hooks),
                len(getattr(module, "_forward_hooks_with_kwargs", ())),
                len(getattr(module, "_forward_pre_hooks_with_kwargs", ())),
                len(getattr(module, "_forward_hooks_always_called", ())),
            )
            for index, name, module in modules
        },
        "instance forwards": sorted(
            (index, name) for index, name, module in modules if "forward" in vars(module)
        ),
        "global hooks": (
            len(nn.modules.module._global_forward_hooks),
            len(nn.modules.module._global_forward_pre_hooks),
        ),
        "mode stack": [type(mode).__name__ for mode in
                       torch.overrides._get_current_function_mode_stack()],
        "stance": dynamo_stance(),
        "get_local on": get_local.is_active,
        "sdpa_capture on": sdpa_capture.is_active,
        "get_local policy": get_local.policy,
    }


class Interrupting(nn.Module):
    """Runs `inner`, then raises `error` (when set) from inside the model's forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.error = None

    def forward(self, x):
        out = self.inner(x)
        if self.error is not None:
            raise self.error
        return out


def vit(fused):
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=(16, 16), patch_size=4, dim=32, depth=2, num_heads=4, fused=fused
    ).eval()


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():  # torch's enable_nested_tensor notice, not ours
        warnings.simplefilter("ignore", UserWarning)
        return nn.TransformerEncoder(layer, 2).eval()


MODELS = {
    "eager softmax": (lambda: vit(False), lambda: torch.randn(2, 3, 16, 16)),
    "fused sdpa": (lambda: vit(True), lambda: torch.randn(2, 3, 16, 16)),
    "encoder fast path": (encoder, lambda: torch.randn(2, 5, 32)),
}


pytestmark = pytest.mark.usefixtures("capture_left_off")


def twins(kind):
    build, make_input = MODELS[kind]
    model = Interrupting(build())
    twin = copy.deepcopy(model)  # never captured: the oracle for the next output
    torch.manual_seed(1)
    return model, twin, make_input()


def assert_left_nothing(before, model, twin, x):
    assert process_state(model) == before
    with torch.no_grad():
        assert torch.equal(model(x), twin(x)), "the next output differs from a never-captured twin"


# -- exits from a capture_attention block ----------------------------------------------------

EXITS = ["normal", "exception in the model", "KeyboardInterrupt in the model",
         "KeyboardInterrupt while recording"]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("exit", EXITS)
def test_a_capture_attention_block_leaves_nothing_behind(kind, exit, monkeypatch):
    model, twin, x = twins(kind)
    before = process_state(model)
    expected = {"normal": None, "exception in the model": ValueError,
                "KeyboardInterrupt in the model": KeyboardInterrupt,
                "KeyboardInterrupt while recording": KeyboardInterrupt}[exit]
    if exit == "exception in the model":
        model.error = ValueError("the user's bug")
    elif exit == "KeyboardInterrupt in the model":
        model.error = KeyboardInterrupt()
    elif exit == "KeyboardInterrupt while recording":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(attention_module, "snapshot", interrupted)
    if expected is None:
        with capture_attention(model) as maps, torch.no_grad():
            model(x)
        assert len(maps) > 0
    else:
        with pytest.raises(expected):
            with capture_attention(model), torch.no_grad():
                model(x)
    monkeypatch.undo()
    model.error = None
    assert_left_nothing(before, model, twin, x)


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_start_interrupted_half_way_leaves_nothing_behind(kind, monkeypatch):
    model, twin, x = twins(kind)
    before = process_state(model)
    original = nn.Module.register_forward_hook
    calls = []

    def interrupted_on_the_third(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "register_forward_hook", interrupted_on_the_third)
    recorder = capture_attention(model)
    with pytest.raises(KeyboardInterrupt):
        recorder.start()
    monkeypatch.undo()
    recorder.stop()  # a no-op after a failed start
    assert_left_nothing(before, model, twin, x)
    with capture_attention(model) as maps, torch.no_grad():  # and it can start again
        model(x)
    assert len(maps) > 0


ORDERS = {
    "nested": ["a.start", "b.start", "b.stop", "a.stop"],
    "crossed": ["a.start", "b.start", "a.stop", "b.stop"],
    "restarted": ["a.start", "a.stop", "b.start", "a.start", "b.stop", "a.stop"],
}


@pytest.mark.parametrize("one_model", [True, False], ids=["one model", "two models"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_recorders_stopped_in_any_order_leave_nothing_behind(order, one_model):
    model, twin, x = twins("fused sdpa")
    other, other_twin, _ = twins("eager softmax")
    if one_model:
        other, other_twin = model, twin
    before = process_state(model, other)
    recorders = {"a": capture_attention(model), "b": capture_attention(other)}
    with torch.no_grad():
        for step in ORDERS[order]:
            name, action = step.split(".")
            getattr(recorders[name], action)()
            model(x)
            other(x)
    assert process_state(model, other) == before
    with torch.no_grad():
        assert torch.equal(model(x), twin(x)) and torch.equal(other(x), other_twin(x))
    assert all(len(recorder.maps) > 0 for recorder in recorders.values())


def test_every_api_nested_and_interrupted_leaves_nothing_behind():
    model, twin, x = twins("eager softmax")
    before = process_state(model)
    model.error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        with get_local.capture(), sdpa_capture.capture(), capture_attention(model):
            with torch.no_grad():
                model(x)
    model.error = None
    assert_left_nothing(before, model, twin, x)


def test_threads_recording_their_own_models_leave_nothing_behind():
    pairs = [twins(kind) for kind in ["eager softmax", "fused sdpa", "encoder fast path"] * 2]
    models = [model for model, _, _ in pairs]
    before = process_state(*models)
    failures = []
    start = threading.Barrier(len(pairs))

    def run(index, model, x):
        try:
            start.wait()
            for step in range(5):
                model.error = KeyboardInterrupt() if (index + step) % 3 == 0 else None
                try:
                    with capture_attention(model), torch.no_grad():
                        model(x)
                except KeyboardInterrupt:
                    pass
            model.error = None
        except BaseException as error:  # noqa: BLE001  (reported below)
            failures.append(repr(error))

    threads = [threading.Thread(target=run, args=(index, model, x))
               for index, (model, _, x) in enumerate(pairs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert process_state(*models) == before
    with torch.no_grad():
        for model, twin, x in pairs:
            assert torch.equal(model(x), twin(x))


def test_a_call_interrupted_in_another_thread_leaves_nothing_that_records_or_changes_output():
    """The recorder is started and stopped in this thread; the model runs, and is interrupted,
    in another: stop() cannot take that thread's watch mode off its stack, but it records
    nothing more, the output stays the never-captured one, and a new start counts afresh."""
    model, twin, x = twins("eager softmax")
    recorder = AttentionRecorder(model)
    results = {}

    def in_the_other_thread(step):
        with torch.no_grad():
            if step == "interrupted":
                model.error = KeyboardInterrupt()
                try:
                    model(x)
                except KeyboardInterrupt:
                    pass
                model.error = None
            else:
                results[step] = (
                    model(x),
                    [type(mode).__name__ for mode in
                     torch.overrides._get_current_function_mode_stack() if getattr(mode, "on", 0)],
                )

    holder = threading.Event()
    steps = []

    def worker():
        while holder.wait(timeout=60):
            holder.clear()
            if not steps:
                return
            try:
                in_the_other_thread(steps.pop(0))
            finally:
                done.set()

    done = threading.Event()
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()

    def in_thread(step):
        steps.append(step)
        holder.set()
        assert done.wait(timeout=60), f"the other thread did not finish {step!r}"
        done.clear()

    recorder.start()
    in_thread("interrupted")  # leaves its calls open and its watch mode on its stack
    recorder.stop()
    recorded = {path: len(entries) for path, entries in recorder.maps.items()}
    in_thread("after stop")
    assert "after stop" in results, "the model failed in the other thread"
    output, active_modes = results["after stop"]
    assert active_modes == []  # what stayed on that thread's stack passes calls through
    assert {path: len(entries) for path, entries in recorder.maps.items()} == recorded
    with torch.no_grad():
        assert torch.equal(output, twin(x))
    recorder.maps.clear()
    recorder.start()
    in_thread("started again")
    recorder.stop()
    steps.clear()
    holder.set()
    thread.join()
    # One entry per attention module for the one call, none from the interrupted one.
    assert {path: len(entries) for path, entries in recorder.maps.items()} == {
        "inner.blocks.0.attn": 1, "inner.blocks.1.attn": 1,
    }

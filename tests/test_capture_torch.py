"""get_local on real PyTorch models: values against independent oracles, policies, compilers."""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from examples.toy_vit import Attention, VisionTransformer  # noqa: E402
from tests.core.oracle import run_with_oracle  # noqa: E402
from visualizer import _torch_internals, get_local  # noqa: E402
from visualizer.capture import GetLocal  # noqa: E402

KEY = "Attention.forward"

# torch 2.13 deprecates TorchScript; the tests here pin what it does while it exists.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=(32, 24), patch_size=4, depth=12).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 24)


@pytest.fixture(autouse=True)
def restore_get_local():
    yield
    get_local.deactivate()
    get_local.cache = {}


def test_vit_maps_match_the_settrace_oracle_and_outputs_are_bitwise_equal(vit, images):
    with torch.no_grad():
        off = vit(images)
        _, oracle = run_with_oracle(lambda: vit(images), Attention.forward.__code__, ("attn",))
        get_local.activate()
        on = vit(images)
    assert torch.equal(on, off)
    maps = get_local.cache[KEY]
    tokens = 1 + 8 * 6
    assert len(maps) == 12 and len(oracle) == 12
    for layer, (got, (want,)) in enumerate(zip(maps, oracle)):
        assert isinstance(got, np.ndarray) and got.shape == (3, 4, tokens, tokens)
        assert np.array_equal(got, want.numpy()), f"layer {layer}"
        assert np.allclose(got.sum(-1), 1, atol=1e-5)


def test_huggingface_vit_instrumented_in_place_matches_output_attentions():
    transformers = pytest.importorskip("transformers")
    from transformers.models.vit import modeling_vit
    if not hasattr(modeling_vit, "eager_attention_forward"):
        pytest.skip(f"transformers {transformers.__version__}'s ViT has no module-level "
                    "eager_attention_forward (checked: 4.48.0 lacks it, 4.52.4 has it)")

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    # The library's own function, captured without editing its source.
    get_local("attn_weights")(modeling_vit.eager_attention_forward)
    with get_local.capture() as cache, torch.no_grad():
        outputs = model(pixel_values=pixels, output_attentions=True)
    captured = cache["eager_attention_forward"]
    assert len(captured) == 3 == len(outputs.attentions)
    for got, want in zip(captured, outputs.attentions):
        assert got.shape == (2, 4, 17, 17)
        np.testing.assert_array_equal(got, want.numpy())


def test_keep_on_device_dtype_and_bfloat16(vit, images):
    with torch.no_grad():
        reference = [m for m in _maps(vit, images)]
        get_local.activate(keep_on_device=True)
        vit(images)
        on_device = get_local.cache[KEY]
        assert all(isinstance(t, torch.Tensor) and t.device == images.device for t in on_device)
        assert all(torch.equal(t, torch.from_numpy(r)) for t, r in zip(on_device, reference))

        get_local.cache = {}
        get_local.activate(dtype="float16")
        vit(images)
        assert all(m.dtype == np.float16 for m in get_local.cache[KEY])
        np.testing.assert_allclose(get_local.cache[KEY][0], reference[0], atol=1e-3)

        # A bfloat16 model: numpy has no bfloat16; stored exactly as float32.
        vit_bf16 = vit.to(torch.bfloat16)
        get_local.cache = {}
        get_local.activate()
        vit_bf16(images.to(torch.bfloat16))
        maps = get_local.cache[KEY]
        assert len(maps) == 12 and all(m.dtype == np.float32 for m in maps)
        get_local.cache = {}
        get_local.activate(keep_on_device=True)
        vit_bf16(images.to(torch.bfloat16))
        raw = get_local.cache[KEY]
        np.testing.assert_array_equal(maps[0], raw[0].float().numpy())


def test_detach_false_keeps_the_graph_for_gradients(vit, images):
    get_local.activate(keep_on_device=True, detach=False)
    logits = vit(images)
    maps = get_local.cache[KEY]
    assert all(m.requires_grad for m in maps)
    grads = torch.autograd.grad(logits[:, 0].sum(), maps)
    assert len(grads) == 12 and all(g.shape == maps[0].shape for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_snapshot_of_a_tensor_the_caller_changes_in_place():
    class Scores(torch.nn.Module):
        @get_local("scores")
        def forward(self, x):
            scores = x * 2
            return scores

    for policy in ({}, {"keep_on_device": True}):
        get_local.cache = {}
        get_local.activate(**policy)
        out = Scores()(torch.ones(3))
        out.zero_()
        stored = get_local.cache["test_snapshot_of_a_tensor_the_caller_changes_in_place."
                                 "<locals>.Scores.forward"][0]
        assert np.array_equal(np.asarray(stored), [2.0, 2.0, 2.0]), policy


def test_select_keeps_only_the_cls_row(vit, images):
    reference = _maps(vit, images)
    # A separate instance, so the selection does not stay on the global one.
    selecting = GetLocal()
    selecting("attn", select=lambda attn: attn[:, :, 0])(Attention.forward)
    with selecting.capture() as cache, torch.no_grad():
        vit(images)
    rows = cache[KEY]
    assert rows[0].shape == (3, 4, 49)
    for row, full in zip(rows, reference):
        np.testing.assert_array_equal(row, full[:, :, 0])


# Dynamo's reset notice is said once per switch object: get_local says it in whichever of
# these tests runs first; test_switching_capture_..._resets_dynamo asserts it.
RESET_NOTICE = pytest.mark.filterwarnings(
    "ignore:get_local. capture was switched while torch.compile'd code existed:RuntimeWarning"
)


@RESET_NOTICE
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_captures_what_eager_mode_captures(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = VisionTransformer(img_size=(16, 16), patch_size=4, depth=2).eval()
    images = torch.randn(2, 3, 16, 16)
    reference = _maps(model, images)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        with get_local.capture() as cache:
            out = compiled(images)
            compiled(images)
        # Capture off: the same compiled model runs and records nothing.
        compiled(images)
    assert cache[KEY] is not None and len(cache[KEY]) == 4
    for got, want in zip(cache[KEY], reference * 2):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert get_local.cache.get(KEY, []) == []
    torch.testing.assert_close(out, model(images), rtol=1e-4, atol=1e-5)


def test_torchscript_script_runs_but_cannot_capture(vit, images):
    """TorchScript compiles the source to its own IR: no Python bytecode runs.

    The README states this limitation; this test pins it down so that a change
    in behaviour is noticed.
    """
    scripted = torch.jit.script(vit)
    with torch.no_grad(), get_local.capture() as cache:
        out = scripted(images)
    torch.testing.assert_close(out, vit(images))
    assert cache.get(KEY) == []


def test_torch_jit_trace_says_the_traced_module_will_not_capture(vit, images):
    with get_local.capture() as cache, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(vit, images, check_trace=False)
        traced(images)
    assert any("torch.jit.trace" in str(w.message) and "will not capture" in str(w.message)
               for w in caught)
    assert len(cache[KEY]) == 12  # from tracing only: the traced call added none


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_numpy_and_on_device():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=(16, 16), patch_size=4, depth=2).eval().cuda()
    images = torch.randn(2, 3, 16, 16, device="cuda")
    reference = _maps(model.cpu(), images.cpu())
    model.cuda()
    with torch.no_grad():
        with get_local.capture() as cache:
            model(images)
        with get_local.capture(keep_on_device=True) as on_device:
            model(images)
    for got, device_map, want in zip(cache[KEY], on_device[KEY], reference):
        assert isinstance(got, np.ndarray) and device_map.is_cuda
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(device_map.cpu().numpy(), want, atol=1e-5)


def _maps(model, images):
    """Reference maps: the same model's attention, read by the settrace oracle."""
    with torch.no_grad():
        _, oracle = run_with_oracle(lambda: model(images), Attention.forward.__code__, ("attn",))
    return [values[0].float().numpy() for values in oracle]


DATALOADER_SCRIPT = """
import torch
from torch.utils.data import DataLoader, Dataset
from visualizer import get_local

@get_local("features")
def augment(x):
    features = x * 2
    return features

class Items(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, index):
        return augment(torch.full((3,), float(index)))

get_local.activate()
for batch in DataLoader(Items(), batch_size=2, num_workers=2):
    pass
augment(torch.ones(3))  # in the main process: no warning
print("main process entries:", len(get_local.cache["augment"]))
"""


def test_dataloader_workers_that_capture_say_so(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "loader.py"
    script.write_text(DATALOADER_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "main process entries: 1" in done.stdout
    warnings_seen = done.stderr.count("get_local: augment was captured in DataLoader worker")
    assert warnings_seen == 2, done.stderr  # once in each of the two workers
    assert "captures stay in that process's get_local.cache and never reach the parent" in (
        done.stderr
    )


def test_model_compiled_while_capture_was_off_captures_after_activate(vit, images):
    expected = _maps(vit, images)  # eager mode's maps
    compiled = torch.compile(vit, backend="eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reset notice: asserted below
        plain = compiled(images)  # compiled with capture off: no graph break, no recorder
        get_local.activate()
        captured = compiled(images)
    assert torch.equal(plain, captured)
    maps = get_local.cache["Attention.forward"]
    assert len(maps) == len(expected)
    for got, want in zip(maps, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    get_local.deactivate()
    get_local.clear()
    with torch.no_grad():
        assert torch.equal(compiled(images), plain)
    assert get_local.cache["Attention.forward"] == []  # off again: the graph without capture


def test_switching_capture_with_compiled_code_around_says_it_resets_dynamo():
    gl = GetLocal()

    @gl("y")
    def double(x):
        y = x * 2
        return y

    compiled = torch.compile(lambda x: double(x) + 1, backend="eager")
    compiled(torch.ones(2))
    with pytest.warns(RuntimeWarning, match=r"get_local: capture was switched while "
                      r"torch.compile'd code existed; Dynamo's compiled code was reset") as caught:
        gl.activate()
    assert caught[0].filename == __file__
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 3.0))
    assert [y.tolist() for y in gl.cache[double.__qualname__]] == [[2.0, 2.0]]
    gl.deactivate()


class _Summed(torch.nn.Module):
    def forward(self, x):
        return _sine_sum(x)


@get_local("y")
def _sine_sum(x):
    y = x.sin()
    return y.sum()


TRANSFORMS = {
    "vmap": (lambda: torch.func.vmap(_sine_sum)(torch.ones(3, 2)), "a torch.func transform"),
    "grad": (lambda: torch.func.grad(_sine_sum)(torch.ones(3)), "a torch.func transform"),
    "jacrev": (lambda: torch.func.jacrev(_sine_sum)(torch.ones(3)), "a torch.func transform"),
    "fx": (lambda: torch.fx.symbolic_trace(_Summed()), "torch.fx symbolic tracing"),
    "export": (
        lambda: torch.export.export(_Summed(), (torch.ones(3),)),
        "torch.export or fake-tensor tracing",
    ),
}
# torch.export traces with Dynamo (strict) before torch 2.8: it cannot pass a
# function get_local marks for Dynamo to skip (checked: 2.6.0 fails, 2.8.0 passes).
TRANSFORM_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(
        _torch_internals.torch_release() < (2, 8), reason="torch.export before torch 2.8 is strict: "
        "Dynamo refuses the get_local function (torch._dynamo.exc.Unsupported)"))
    if name == "export" else name
    for name in TRANSFORMS
]


@pytest.mark.parametrize("transform", TRANSFORM_PARAMS)
def test_transforms_that_trace_are_not_recorded_and_the_call_is_unchanged(transform):
    run, named = TRANSFORMS[transform]
    expected = run() if transform in ("vmap", "grad", "jacrev") else None
    gl = GetLocal()
    gl("y")(_sine_sum)  # the same function, under a fresh switch with its own warnings
    gl.activate()
    try:
        with pytest.warns(RuntimeWarning, match=f"_sine_sum ran under {named}.*'y' is not a "
                          "concrete value; such calls are not recorded"):
            result = run()
        if expected is not None:
            assert torch.equal(result, expected)
        assert gl.cache.get("_sine_sum") == []
        _sine_sum(torch.ones(2))  # an ordinary call still records
        assert len(gl.cache["_sine_sum"]) == 1
    finally:
        gl.deactivate()


UNSTORABLE = {
    "float8": lambda: torch.zeros(2).to(torch.float8_e4m3fn),
    "complex32": lambda: torch.zeros(2, dtype=torch.complex32),
    "sparse": lambda: torch.eye(2).to_sparse(),
    "meta": lambda: torch.empty(2, device="meta"),
}


@pytest.mark.parametrize("kind", list(UNSTORABLE))
def test_tensors_numpy_cannot_hold_become_markers_not_errors(kind):
    from visualizer import NOT_CAPTURED

    gl = GetLocal()

    @gl("value")
    def make():
        value = UNSTORABLE[kind]()
        return value.shape

    gl.activate()
    with pytest.warns(RuntimeWarning, match=r"'value' in .*make could not be stored"):
        shape = make()  # the user's call is not broken by the capture
    assert shape == (2,) or shape == (2, 2)
    assert gl.cache[make.__qualname__] == [NOT_CAPTURED]
    gl.deactivate()


def test_huggingface_model_output_is_snapshotted():
    transformers = pytest.importorskip("transformers")
    output = transformers.modeling_outputs.BaseModelOutput(
        last_hidden_state=torch.zeros(1, 2), attentions=(torch.ones(1, 1, 2, 2),)
    )
    gl = GetLocal()

    @gl("result")
    def forward():
        result = output
        return result

    gl.activate()
    forward()
    entry = gl.cache[forward.__qualname__][0]
    output.last_hidden_state.add_(5)  # changed in place after the call
    assert type(entry) is type(output)
    np.testing.assert_array_equal(entry.last_hidden_state, np.zeros((1, 2)))
    np.testing.assert_array_equal(entry["attentions"][0], np.ones((1, 1, 2, 2)))
    gl.deactivate()


def test_a_module_is_not_copied_on_every_call():
    from visualizer import NOT_CAPTURED

    gl = GetLocal()

    @gl("layer")
    def build():
        layer = torch.nn.Linear(2, 2)
        return layer

    gl.activate()
    with pytest.warns(RuntimeWarning, match=r"a Linear module is not copied on every call; "
                      r"capture the tensors you need from it"):
        assert isinstance(build(), torch.nn.Linear)
    assert gl.cache[build.__qualname__] == [NOT_CAPTURED]
    gl.deactivate()

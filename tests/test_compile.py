"""capture_attention on torch.compile'd models: recorded from the compiled graphs.

What is checked, against oracles that do not go through the recorder: maps
equal the weights computed by hand from each block's own projections (or the
model's own `need_weights` / `output_attentions` weights); the captured run has
the graphs and graph breaks of the uncaptured one; recording started and
stopped again and again compiles once; outputs are the uncaptured compiled
outputs. The backends are Dynamo's `eager` and `aot_eager` (cheap) and inductor
on the CPU (slow to compile on a small machine: a few tests only).
"""

import types

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from examples.toy_vit import VisionTransformer  # noqa: E402
from tests.test_attention import by_hand as attention_by_hand  # noqa: E402
from visualizer import _torch_internals, capture_attention, get_local  # noqa: E402
from visualizer.capture import GetLocal  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _torch_internals.has(_torch_internals.IN_GRAPH_CAPTURE),
    reason=f"recording inside compiled graphs needs torch>=2.11; this is torch {torch.__version__}",
)


@pytest.fixture(autouse=True)
def _fresh_counters():
    counters.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add noise on a busy machine
    yield
    torch.set_num_threads(threads)


def toy_vit(fused, depth=2):
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=(16, 24), patch_size=4, dim=32, depth=depth, num_heads=4, fused=fused
    ).eval()


IMAGES_SHAPE = (2, 3, 16, 24)  # 24 patches + CLS = 25 tokens
# CUDA where a GPU is (the same tests; no run here has had one yet): a parameter, not a skip.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def by_hand(model, images):
    """Each block's softmax(q kᵀ scale), from its own projections and its input, eagerly."""
    return {f"blocks.{i}.attn": m for i, m in enumerate(attention_by_hand(model, images))}


def graphs():
    return counters["stats"]["unique_graphs"]


def graph_breaks():
    return sum(counters["graph_break"].values())


def graphs_and_breaks(model, images):
    """(graphs, graph breaks) Dynamo makes of one call, by torch._dynamo.explain."""
    report = torch._dynamo.explain(model)(images)
    return report.graph_count, report.graph_break_count


@pytest.mark.parametrize(
    "backend,fused",
    [
        ("eager", False),
        ("eager", True),
        ("aot_eager", False),
        ("aot_eager", True),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_maps_equal_the_weights_computed_by_hand(backend, fused, device):
    model = toy_vit(fused).to(device)
    images = torch.randn(IMAGES_SHAPE, device=device)
    expected = {key: want.cpu() for key, want in by_hand(model, images).items()}
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        plain = compiled(images)
        compiled_before = graphs()
        with capture_attention(compiled) as maps:
            output = compiled(images)
        # Recorded by compiled code: one new graph, traced with the recording in it.
        assert graphs() == compiled_before + 1
        assert torch.equal(output, plain)
        compiled(images)
    assert graphs() == compiled_before + 1  # after stop: the uncaptured graph again
    assert list(maps) == list(expected)
    for key, want in expected.items():
        assert len(maps[key]) == 1
        assert_close(torch.as_tensor(maps[key][0]), want, rtol=0, atol=1e-5)


def test_multihead_attention_maps_equal_its_own_weights():
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model, x = Encoder().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        _, expected = model.attn(x, x, x, need_weights=True, average_attn_weights=False)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with capture_attention(compiled, heads=[0, 2]) as maps:
            compiled(x)
    assert list(maps) == ["attn"]
    assert_close(torch.as_tensor(maps["attn"][0]), expected[:, [0, 2]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_transformers_bert_maps_equal_its_output_attentions(implementation):
    pytest.importorskip("transformers")
    from tests import hf_models

    case = hf_models.CASES["bert"]
    inputs = case.inputs()
    with torch.no_grad():
        expected = hf_models.reference_attentions(case, case.build("eager"), inputs)
        model = case.build(implementation)
        compiled = torch.compile(model, backend="aot_eager")
        compiled(**inputs)
        with capture_attention(compiled, rows=0) as maps:
            compiled(**inputs)
    assert graph_breaks() == 0
    assert list(maps) == list(expected)
    for key, (want,) in expected.items():
        assert_close(torch.as_tensor(maps[key][0]), want[:, :, :1], rtol=0, atol=1e-5)


def test_no_graph_break_is_added_and_fullgraph_compiles():
    model = toy_vit(fused=True)
    images = torch.randn(IMAGES_SHAPE)
    with torch.no_grad():
        plain = graphs_and_breaks(model, images)
        with capture_attention(model, rows=0) as maps:
            captured = graphs_and_breaks(model, images)
        assert captured == plain == (1, 0)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with capture_attention(compiled, rows=0) as maps:
            compiled(images)
    assert len(maps) == 2


class BreaksBetweenBlocks(nn.Module):
    """A model with a graph break of its own, between its two blocks."""

    def __init__(self):
        super().__init__()
        self.vit = toy_vit(fused=False)

    def forward(self, images):
        x = self.vit.patch_embed(images).flatten(2).transpose(1, 2) + self.vit.pos_embed
        x = self.vit.blocks[0](torch.cat([self.vit.cls_token.expand(2, -1, -1), x], dim=1))
        torch._dynamo.graph_break()
        return self.vit.blocks[1](x)


def test_a_models_own_graph_break_stays_the_only_one():
    model = BreaksBetweenBlocks().eval()
    images = torch.randn(IMAGES_SHAPE)
    with torch.no_grad():
        plain = graphs_and_breaks(model, images)
        with capture_attention(model) as maps:
            captured = graphs_and_breaks(model, images)
    assert captured == plain == (2, 1)
    assert list(maps) == ["vit.blocks.0.attn", "vit.blocks.1.attn"]


def test_recording_started_and_stopped_every_few_steps_compiles_once():
    model = toy_vit(fused=True)
    images = torch.randn(IMAGES_SHAPE)
    compiled = torch.compile(model, backend="eager")
    recorder = capture_attention(compiled, rows=0)
    recorded_steps = 0
    with torch.no_grad():
        for step in range(100):
            if step == 20:  # both graphs exist from here on: no compilation at all
                settled = graphs()
            if step % 10 == 5:  # a block of its own, with a new recorder
                with capture_attention(compiled, rows=0) as maps:
                    compiled(images)
                assert [len(entries) for entries in maps.values()] == [1, 1]
            elif step % 10 == 0:
                recorder.start()
                compiled(images)
                recorder.stop()
                recorded_steps += 1
            else:
                compiled(images)
    assert graphs() == settled == 2
    assert [len(entries) for entries in recorder.maps.values()] == [recorded_steps] * 2


def training_step(model, compiled, images):
    """One step of `compiled`: (output, the gradients of `model`'s parameters)."""

    def step():
        model.zero_grad()
        output = compiled(images)
        output.square().mean().backward()
        return output.detach(), [p.grad.clone() for p in model.parameters()]

    return step


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_captured_training_step_gives_the_compiled_outputs_and_gradients(backend):
    model = toy_vit(fused=False, depth=1).train()
    images = torch.randn(IMAGES_SHAPE)
    compiled = torch.compile(model, backend=backend)
    step = training_step(model, compiled, images)
    expected = by_hand(model, images)
    plain_output, plain_grads = step()
    with capture_attention(compiled, rows=0) as maps:
        output, grads = step()
    assert torch.equal(output, plain_output)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    assert list(maps) == list(expected)
    for key, want in expected.items():
        assert len(maps[key]) == 1
        assert_close(torch.as_tensor(maps[key][0]), want[:, :, :1], rtol=0, atol=1e-5)


class VariableLength(nn.Module):
    """Self-attention over sequences of any length, through SDPA with a causal mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(16, 48)
        self.num_heads = 2

    def forward(self, x):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(batch, tokens, 16)


def test_dynamic_shapes_with_changing_sequence_lengths():
    model = nn.Sequential(VariableLength(), VariableLength()).eval()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    lengths = [5, 7, 9, 6]
    with torch.no_grad():
        sequences = [torch.randn(2, n, 16) for n in lengths]
        expected = []
        for x in sequences:
            first = model[0].qkv(x).reshape(2, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            scores = (first[0] @ first[1].transpose(-2, -1)) / 8**0.5
            expected.append(scores.masked_fill(~mask, float("-inf")).softmax(-1))
        compiled(sequences[0])
        with capture_attention(compiled) as maps:
            for x in sequences:
                compiled(x)
    assert graphs() == 2  # one dynamic graph uncaptured, one captured: none per length
    assert [tuple(m.shape) for m in maps["0"]] == [(2, 2, n, n) for n in lengths]
    for got, want in zip(maps["0"], expected):
        assert_close(torch.as_tensor(got), want, rtol=0, atol=1e-5)


def test_selected_rows_never_form_the_full_map_in_the_graph():
    model = toy_vit(fused=True)
    images = torch.randn(IMAGES_SHAPE)
    tokens = 25
    shapes = []

    def backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                shapes.append(tuple(value.shape))
        return graph_module.forward

    expected = by_hand(model, images)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), capture_attention(compiled, rows=0, heads=[1, 3]) as maps:
        compiled(images)
    assert (2, 2, 1, tokens) in shapes  # the selected weights were computed in the graph
    assert not [shape for shape in shapes if shape[-2:] == (tokens, tokens)]
    for key, want in expected.items():
        assert_close(torch.as_tensor(maps[key][0]), want[:, [1, 3], :1], rtol=0, atol=1e-5)


# get_local inside compiled code. Its reset notice (the first switch after Dynamo compiled
# code from a function's original code) is said once per process: tested in
# test_capture_torch, ignored here so that these tests do not depend on test order.
_RESET_NOTICE = (
    "ignore:get_local. capture was switched while torch.compile'd code existed:RuntimeWarning"
)


def get_local_maps(model, images, block):
    """{blocks.i.attn: map} from what get_local captured in one call (2 blocks, in order)."""
    entries = block["Attention.forward"]
    return {f"blocks.{i}.attn": torch.as_tensor(entry) for i, entry in enumerate(entries)}


@pytest.mark.filterwarnings(_RESET_NOTICE)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_get_local_records_from_the_compiled_graph_with_fullgraph(backend, device):
    model = toy_vit(fused=False).to(device)
    images = torch.randn(IMAGES_SHAPE, device=device)
    expected = {key: want.cpu() for key, want in by_hand(model, images).items()}
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        with get_local.capture() as captured:
            output = compiled(images)
        assert graphs() == 1 and graph_breaks() == 0  # traced with the recorder in it
        plain = compiled(images)  # capture off: the graph without the recorder
    assert graphs() == 2
    maps = get_local_maps(model, images, captured)
    assert list(maps) == list(expected)
    for key, want in expected.items():
        assert_close(maps[key], want, rtol=0, atol=1e-5)
    if backend == "inductor":  # a graph with one more node: rounding may differ
        assert_close(output, plain, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(output, plain)


@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_get_local_adds_no_graph_break():
    model = toy_vit(fused=False)
    images = torch.randn(IMAGES_SHAPE)
    with torch.no_grad():
        plain = graphs_and_breaks(model, images)
        with get_local.capture() as captured:
            recorded = graphs_and_breaks(model, images)
    assert recorded == plain == (1, 0)
    assert len(captured["Attention.forward"]) == 2  # explain() ran the graph once


@pytest.mark.usefixtures("capture_left_off")  # it reads the process-wide cache
@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_get_local_switched_every_few_steps_compiles_once_per_state():
    model = toy_vit(fused=False)
    images = torch.randn(IMAGES_SHAPE)
    expected = by_hand(model, images)
    compiled = torch.compile(model, backend="eager")
    recorded_steps = 0
    with torch.no_grad():
        plain = compiled(images)
        for step in range(100):
            if step == 20:  # both graphs exist from here on: no compilation at all
                settled = graphs()
            if step % 10 == 5:  # a capture() block
                with get_local.capture() as block:
                    assert torch.equal(compiled(images), plain)
                assert len(block["Attention.forward"]) == 2
            elif step % 10 == 0:  # the switch
                get_local.activate()
                assert torch.equal(compiled(images), plain)
                get_local.deactivate()
                recorded_steps += 1
            else:
                assert torch.equal(compiled(images), plain)
    # The graph compiled from the original code (Dynamo is reset at the first switch,
    # which puts instrumented code in place), then one graph for "on" and one for "off".
    assert graphs() == settled == 3
    entries = get_local.cache["Attention.forward"]
    assert len(entries) == 2 * recorded_steps
    for index, entry in enumerate(entries):
        assert_close(torch.as_tensor(entry), expected[f"blocks.{index % 2}.attn"], rtol=0,
                     atol=1e-5)


@pytest.mark.filterwarnings(_RESET_NOTICE)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_get_local_in_a_compiled_training_step_keeps_the_compiled_outputs_and_gradients(
    backend,
):
    model = toy_vit(fused=False, depth=2).train()
    images = torch.randn(IMAGES_SHAPE)
    compiled = torch.compile(model, backend=backend)
    step = training_step(model, compiled, images)
    expected = by_hand(model, images)
    plain_output, plain_grads = step()
    with get_local.capture() as captured:
        output, grads = step()
    compiled_again = graphs()
    with get_local.capture():
        step()
    assert graphs() == compiled_again  # the captured graph is reused
    if backend == "inductor":  # a graph with one more node: rounding may differ
        assert_close(output, plain_output, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, plain_grads):
            assert_close(got, want, rtol=1e-4, atol=1e-6)
    else:
        assert torch.equal(output, plain_output)
        assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    maps = get_local_maps(model, images, captured)
    for key, want in expected.items():
        assert_close(maps[key], want, rtol=0, atol=1e-5)
        assert not maps[key].requires_grad


class ExplicitScores(nn.Module):
    """Self-attention over sequences of any length with an explicit softmax: `attn` a local,
    and `scale` a Python float."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q = self.proj(x)
        scale = x.shape[-1] ** -0.5
        attn = (q @ x.transpose(-1, -2) * scale).softmax(-1)
        return attn @ x


class ScaledScores(ExplicitScores):
    """The same forward as a function object of its own, for get_local('attn', 'scale')."""

    forward = types.FunctionType(
        ExplicitScores.forward.__code__, ExplicitScores.forward.__globals__, "forward"
    )
    forward.__qualname__ = "ScaledScores.forward"


def explicit_scores_by_hand(model, x):
    return (model.proj(x) @ x.transpose(-1, -2) / 8**0.5).softmax(-1)


@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_a_value_that_is_no_tensor_is_recorded_between_graphs():
    gl = GetLocal()
    gl("attn", "scale")(ScaledScores.forward)
    model = ScaledScores()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        want = explicit_scores_by_hand(model, x)
        plain = model(x)
        compiled = torch.compile(model, backend="aot_eager")
        with gl.capture() as captured:
            output = compiled(x)
            breaks = graph_breaks()
    assert breaks >= 1  # the float leaves through the recorder run eagerly
    assert torch.equal(output, plain)
    (entry,) = captured["ScaledScores.forward"]
    assert entry["scale"] == 8**-0.5
    assert_close(torch.as_tensor(entry["attn"]), want, rtol=0, atol=1e-6)
    # fullgraph=True cannot break the graph: Dynamo's error carries the reason.
    torch._dynamo.reset()  # the forward's code has its graphs with the break cached
    strict = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), gl.capture(), pytest.raises(Exception, match=(
        r"get_local records 'attn', 'scale' of ScaledScores.forward from inside compiled "
        r"graphs only when every captured value is a tensor")):
        strict(x)


@pytest.mark.filterwarnings(_RESET_NOTICE)
# torch 2.11's inductor, autotuning CPU GEMMs, calls its own deprecated TypedStorage.
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_record_from_the_graph_on_the_cpu(mode):
    # On the CPU, reduce-overhead has no CUDA graphs to make, and max-autotune tunes the
    # CPU kernels (GEMM templates): both record as the default mode does.
    model = toy_vit(fused=False)
    images = torch.randn(IMAGES_SHAPE)
    expected = by_hand(model, images)
    compiled = torch.compile(model, mode=mode)
    with torch.no_grad():
        plain = compiled(images)
        with get_local.capture() as captured:
            from_get_local = compiled(images)
        with capture_attention(compiled) as maps:
            from_capture_attention = compiled(images)
    assert_close(from_get_local, plain, rtol=1e-5, atol=1e-6)
    assert_close(from_capture_attention, plain, rtol=1e-5, atol=1e-6)
    for key, want in expected.items():
        assert_close(get_local_maps(model, images, captured)[key], want, rtol=0, atol=1e-5)
        assert_close(torch.as_tensor(maps[key][0]), want, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_get_local_under_dynamic_shapes_compiles_no_graph_per_length():
    gl = GetLocal()
    gl("attn")(ExplicitScores.forward)
    model = ExplicitScores()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    lengths = [5, 7, 9, 6]
    sequences = [torch.randn(2, n, 8) for n in lengths]
    with torch.no_grad():
        with gl.capture() as captured:
            for x in sequences:
                compiled(x)
        expected = [explicit_scores_by_hand(model, x) for x in sequences]
    assert graphs() == 1  # one dynamic graph, the recorder in it: none per length
    entries = captured["ExplicitScores.forward"]
    assert [tuple(entry.shape) for entry in entries] == [(2, n, n) for n in lengths]
    for got, want in zip(entries, expected):
        assert_close(torch.as_tensor(got), want, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_get_local_blocks_in_two_threads_each_get_their_own_calls_from_the_graph():
    import threading

    gl = GetLocal()
    gl("attn")(ExplicitScores.forward)
    model = ExplicitScores()
    compiled = torch.compile(model, backend="aot_eager")
    inputs = {name: torch.randn(2, 4, 8) for name in ("main", "worker")}
    with torch.no_grad(), gl.capture():
        compiled(inputs["main"])  # compiled once, before the threads
    captured = {}
    ready = threading.Barrier(2)

    def run(name):
        with torch.no_grad(), gl.capture() as block:
            ready.wait()  # both blocks open at once
            for _ in range(3):
                compiled(inputs[name])
            ready.wait()
        captured[name] = block["ExplicitScores.forward"]

    worker = threading.Thread(target=run, args=("worker",))
    worker.start()
    run("main")
    worker.join()
    with torch.no_grad():
        for name, x in inputs.items():
            want = explicit_scores_by_hand(model, x)
            assert len(captured[name]) == 3
            for got in captured[name]:
                assert_close(torch.as_tensor(got), want, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_capture_attention_with_get_local_on_records_from_the_graph():
    model = toy_vit(fused=False)
    images = torch.randn(IMAGES_SHAPE)
    expected = by_hand(model, images)
    with torch.no_grad(), get_local.capture() as captured:
        compiled = torch.compile(model, backend="aot_eager")
        plain = compiled(images)
        compiled_before = graphs()
        with capture_attention(compiled) as maps:
            output = compiled(images)
        assert graphs() == compiled_before + 1  # the recording traced into the graph
        compiled(images)
    assert graphs() == compiled_before + 1
    assert torch.equal(output, plain)
    for key, want in expected.items():
        assert_close(torch.as_tensor(maps[key][0]), want, rtol=0, atol=1e-5)
    assert len(captured["Attention.forward"]) == 3 * 2  # get_local recorded every call too


class NormalisedScores(nn.Module):
    """Attention weights normalised by hand, with no softmax or SDPA for the watch to see:
    capture_attention takes the map get_local captures (`attn`, (B, H, Q, K))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qk = nn.Linear(8, 16)

    @get_local("attn")
    def forward(self, x):
        q, k = self.qk(x).reshape(x.shape[0], x.shape[1], 2, 2, 4).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)).exp()
        attn = scores / scores.sum(-1, keepdim=True)
        return (attn @ q).transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)


def normalised_by_hand(model, x):
    q, k = model.qk(x).reshape(x.shape[0], x.shape[1], 2, 2, 4).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-2, -1)).softmax(-1)


@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_a_decorated_forward_without_softmax_gives_capture_attention_its_map_in_the_graph():
    model = nn.Sequential(NormalisedScores(), NormalisedScores()).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = [normalised_by_hand(model[0], x)]
        expected.append(normalised_by_hand(model[1], model[0](x)))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with get_local.capture():
            plain = compiled(x)
            with capture_attention(compiled, rows=[0, 2]) as maps:
                output = compiled(x)
    assert graph_breaks() == 0
    assert torch.equal(output, plain)
    assert list(maps) == ["0", "1"]
    for key, want in zip(maps, expected):
        assert len(maps[key]) == 1
        assert_close(torch.as_tensor(maps[key][0]), want[:, :, [0, 2]], rtol=0, atol=1e-6)


class InputScores(NormalisedScores):
    """The same forward, its get_local capturing its input `x`: (B, N, C), no map."""

    forward = types.FunctionType(
        NormalisedScores.forward.__code__, NormalisedScores.forward.__globals__, "forward"
    )
    forward.__qualname__ = "InputScores.forward"
    get_local("x")(forward)


@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_a_decorated_forward_whose_first_name_is_no_map_says_so_from_the_graph():
    model = InputScores().eval()
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), get_local.capture() as captured:
        plain = compiled(x)
        with pytest.warns(RuntimeWarning) as said:
            with capture_attention(compiled) as maps:
                output = compiled(x)
    assert torch.equal(output, plain)
    assert dict(maps) == {}
    messages = [str(warning.message) for warning in said]
    assert any(
        "InputScores.forward is decorated with get_local, but its first captured name held no "
        "(B, H, Q, K) attention map in the compiled graph; nothing was recorded for ''"
        in message for message in messages
    ), messages
    assert len(captured["InputScores.forward"]) == 2  # get_local itself recorded both calls


class SelectedScores(NormalisedScores):
    """The same forward decorated with select=: its recorder runs eagerly, between graphs."""

    forward = types.FunctionType(
        NormalisedScores.forward.__code__, NormalisedScores.forward.__globals__, "forward"
    )
    forward.__qualname__ = "SelectedScores.forward"
    get_local("attn", select=lambda attn: attn[:, :, :1])(forward)


@pytest.mark.filterwarnings(_RESET_NOTICE)
def test_capture_attention_runs_eagerly_where_a_decorated_forward_has_select():
    model = SelectedScores().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = normalised_by_hand(model, x)[:, :, :1]
        compiled = torch.compile(model, backend="eager")
        with get_local.capture():
            compiled(x)
            compiled_before = graphs()
            with pytest.warns(RuntimeWarning, match=(
                r"runs eagerly while recording: module '' has a get_local-decorated forward "
                r"whose recorder runs eagerly \(it was decorated with select=\)")):
                with capture_attention(compiled) as maps:
                    compiled(x)
    assert graphs() == compiled_before  # forced eager: nothing compiled for the recording
    assert_close(torch.as_tensor(maps[""][0]), expected, rtol=0, atol=1e-6)


def test_a_recorded_compiled_model_can_be_freed():
    import gc
    import weakref

    model = toy_vit(fused=True, depth=1)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), capture_attention(compiled, rows=0) as maps:
        compiled(torch.randn(IMAGES_SHAPE))
    assert len(maps) == 1
    alive = weakref.ref(model)
    del model, compiled
    torch._dynamo.reset()  # compiled code holds the model
    gc.collect()
    assert alive() is None


def test_another_thread_runs_the_uncaptured_graph_while_recording():
    import threading

    model = toy_vit(fused=True, depth=1)
    images = torch.randn(IMAGES_SHAPE)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        plain = compiled(images)
        outputs = []
        with capture_attention(compiled, rows=0) as maps:
            worker = threading.Thread(target=lambda: outputs.append(compiled(images)))
            worker.start()
            worker.join()
            compiled(images)
    # The recording is on the starting thread's mode stack: only its call recorded.
    assert torch.equal(outputs[0], plain)
    assert [len(entries) for entries in maps.values()] == [1]


def test_a_compiled_model_without_attention_says_its_graphs_hold_none():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad(), pytest.warns(RuntimeWarning) as caught:
        with capture_attention(compiled) as maps:
            outputs = compiled(torch.randn(2, 8))
    assert outputs.shape == (2, 8) and dict(maps) == {}
    messages = [str(w.message) for w in caught]
    assert any(
        "no module of the OptimizedModule ran eagerly while recording, and no graph "
        "torch.compile traced from it with capture on holds attention" in m
        for m in messages
    ), messages


def test_a_compiled_model_with_attention_not_called_in_the_block_is_told_to_be_called():
    model = toy_vit(fused=True, depth=1)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        with capture_attention(compiled) as maps:
            compiled(torch.randn(IMAGES_SHAPE))  # its graph with capture on is traced
        assert len(maps["blocks.0.attn"]) == 1
        with pytest.warns(RuntimeWarning, match=r"no module of the OptimizedModule ran while "
                          r"recording \(call the model inside the block\)"):
            with capture_attention(compiled):
                pass


def test_recording_a_compiled_model_again_and_again_keeps_nothing_per_recording():
    """Recorders started and stopped around a compiled model's calls, alternately
    capture_attention and sdpa_capture: the library's sinks, shared modes and listeners stay
    as they are, Dynamo compiles nothing more, and the Python memory allocated by the
    library's code and still held does not grow from one window of recordings to the next
    (one object kept per 4 recordings would show)."""
    import gc
    import os
    import tracemalloc

    import visualizer
    from visualizer import _graph_sink, _in_graph, sdpa_capture

    model = toy_vit(fused=True)
    compiled = torch.compile(model, backend="aot_eager")
    images = torch.randn(IMAGES_SHAPE)

    def recordings(count):
        with torch.no_grad():
            for i in range(count):
                if i % 2:
                    with capture_attention(compiled) as maps:
                        compiled(images)
                    assert [len(maps[f"blocks.{b}.attn"]) for b in (0, 1)] == [1, 1]
                else:
                    with sdpa_capture.capture() as cache:
                        compiled(images)
                    assert len(cache[SDPA_KEY]) == 2
                compiled(images)
        gc.collect()

    def state():
        return (len(_graph_sink._SINKS), _graph_sink._LISTENERS, len(_in_graph._SHARED[model]),
                graphs())

    library = [tracemalloc.Filter(True, os.path.join(os.path.dirname(visualizer.__file__), "*"))]
    recordings(20)  # compiles each state's graph
    before = state()
    tracemalloc.start()
    try:
        recordings(200)
        first = tracemalloc.take_snapshot().filter_traces(library)
        recordings(200)
        second = tracemalloc.take_snapshot().filter_traces(library)
    finally:
        tracemalloc.stop()
    assert state() == before
    # Blocks, not bytes: a dict of the library's that rehashes in place (its size
    # changes, its count does not) is no leak; one object kept per recording is.
    changes = second.compare_to(first, "lineno")
    assert sum(change.count_diff for change in changes) < 50, changes[:5]


# -- sdpa_capture inside compiled code ----------------------------------------------------------

SDPA_KEY = "Attention.forward"  # examples.toy_vit's attention: the function that calls SDPA


def sdpa_capture_block(**selection):
    from visualizer import sdpa_capture

    return sdpa_capture.capture(**selection)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_sdpa_capture_records_from_the_compiled_graph(backend):
    model = toy_vit(fused=True)
    images = torch.randn(IMAGES_SHAPE)
    expected = list(by_hand(model, images).values())
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        plain = compiled(images)
        before, breaks = graphs(), graph_breaks()
        with sdpa_capture_block() as cache:
            output = compiled(images)
        assert graphs() == before + 1  # compiled once more, with the recording in the graph
        assert graph_breaks() == breaks == 0
        assert torch.equal(output, plain)  # the compiled kernels' output, bit for bit
        compiled(images)
    assert graphs() == before + 1  # after the block: the uncaptured graph again
    assert list(cache) == [SDPA_KEY] and len(cache[SDPA_KEY]) == len(expected)
    for got, want in zip(cache[SDPA_KEY], expected):
        assert_close(torch.as_tensor(got), want, rtol=0, atol=1e-5)


def test_sdpa_capture_adds_no_graph_break_and_fullgraph_compiles():
    model = toy_vit(fused=True)
    images = torch.randn(IMAGES_SHAPE)
    expected = list(by_hand(model, images).values())
    with torch.no_grad():
        plain = graphs_and_breaks(model, images)
        with sdpa_capture_block(rows=0):
            captured = graphs_and_breaks(model, images)
        assert captured == plain == (1, 0)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with sdpa_capture_block(rows=0, heads=[1, 3]) as cache:
            compiled(images)
    for got, want in zip(cache[SDPA_KEY], expected):  # rows and heads selected in the graph
        assert tuple(got.shape) == (2, 2, 1, 25)
        assert_close(torch.as_tensor(got), want[:, [1, 3], :1], rtol=0, atol=1e-5)


def test_sdpa_capture_switched_every_few_steps_compiles_once_per_selection():
    from visualizer import sdpa_capture

    model = toy_vit(fused=True)
    images = torch.randn(IMAGES_SHAPE)
    compiled = torch.compile(model, backend="eager")
    recorded = []
    get_local.clear()  # activate() records into the process-wide cache: count only these
    with torch.no_grad():
        for step in range(100):
            if step == 30:  # every variant exists from here on: no compilation at all
                settled = graphs()
            if step % 10 == 0:
                sdpa_capture.activate(rows=0)
                compiled(images)
                sdpa_capture.deactivate()
            elif step % 10 == 5:
                with sdpa_capture.capture() as cache:  # all rows: a variant of its own
                    compiled(images)
                recorded.append([tuple(entry.shape) for entry in cache[SDPA_KEY]])
            else:
                compiled(images)
    assert graphs() == settled == 3  # uncaptured, rows=0, all rows
    entries = get_local.cache[SDPA_KEY]
    assert [tuple(entry.shape) for entry in entries] == [(2, 4, 1, 25)] * 20
    assert recorded == [[(2, 4, 25, 25)] * 2] * 10
    get_local.clear()


class DropoutAttention(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)


def test_sdpa_capture_of_a_dropout_call_records_between_graphs_and_says_so():
    """Dropout's warning is said eagerly: such calls record between graphs, as before."""
    compiled = torch.compile(DropoutAttention(), backend="eager")
    q = torch.randn(1, 2, 3, 4)
    with pytest.warns(RuntimeWarning, match="dropout_p=0.5; the recorded weights are the ones BEFORE"):
        with sdpa_capture_block() as cache:
            compiled(q)
    (entries,) = cache.values()
    assert_close(torch.as_tensor(entries[0]), (q @ q.transpose(-2, -1) / 2).softmax(-1))


CACHED_BEFORE_IMPORT = """
import torch
from examples.toy_vit import VisionTransformer
from tests.test_attention import by_hand

torch.manual_seed(0)
model = VisionTransformer(img_size=(16, 24), patch_size=4, dim=32, depth=2, num_heads=4,
                          fused=True).eval()
images = torch.randn(2, 3, 16, 24)
compiled = torch.compile(model, backend="aot_eager")
with torch.no_grad():
    plain = compiled(images)  # compiled, its graph cached, before the library is imported
import visualizer  # noqa: E402
from visualizer import capture_attention, sdpa_capture  # noqa: E402
with torch.no_grad():
    with capture_attention(compiled) as maps:
        by_module = compiled(images)
    with sdpa_capture.capture() as cache:
        by_function = compiled(images)
expected = by_hand(model, images)
assert torch.equal(by_module, plain) and torch.equal(by_function, plain)
assert list(maps) == ["blocks.0.attn", "blocks.1.attn"], list(maps)
for got, want in zip([entries[0] for entries in maps.values()], expected):
    assert (torch.as_tensor(got) - want).abs().max() < 1e-5
for got, want in zip(cache["Attention.forward"], expected):
    assert (torch.as_tensor(got) - want).abs().max() < 1e-5
print("recorded from the graphs")
"""


def test_a_model_compiled_before_the_library_was_imported_is_recorded(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "cached_before_import.py"
    script.write_text(CACHED_BEFORE_IMPORT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Warnings are errors, but for torch's own notice on Python 3.13.0 (as in pyproject).
    strict = ["-W", "error", "-W", "ignore:Guards may run slower on Python 3.13.0:RuntimeWarning"]
    done = subprocess.run(
        [sys.executable, *strict, str(script)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": root}, cwd=root, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recorded from the graphs" in done.stdout

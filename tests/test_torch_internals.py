"""Canaries for the private torch and transformers APIs visualizer depends on.

Captures rest on a few private or undocumented behaviours of torch and
transformers. When a release changes one, captures do not raise: they go
silently empty or wrong. Each test here checks that one such API exists and
still behaves as the package assumes, through the wrapper in
`visualizer/_torch_internals.py` where there is one, and a failure names the API
and the package code that uses it, so a new release breaks here, loudly, first.
"""
import sys

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from visualizer import _torch_internals  # noqa: E402


def changed(api, used_by, what):
    """Fail naming the private API, the torch version and the package code relying on it."""
    pytest.fail(
        f"private API {api} changed in torch {torch.__version__}: {what} "
        f"(visualizer relies on it in {used_by})",
        pytrace=False,
    )


def attribute(owner, dotted, used_by):
    """`owner.<dotted>`, or a failure naming the missing API."""
    value = owner
    for name in dotted.split("."):
        if not hasattr(value, name):
            changed(f"{getattr(owner, '__name__', owner)}.{dotted}", used_by, "it no longer exists")
        value = getattr(value, name)
    return value


class FunctionLog(TorchFunctionMode):
    """Records every torch function called while it is on."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


# -- autograd ---------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_current_autograd_node_is_set_only_while_backward_recomputes(use_reentrant):
    api = "torch._C._current_autograd_node"
    used_by = "capture.py (keep), store.py, attention.py: checkpointed forwards re-run in backward"
    attribute(torch, "_C._current_autograd_node", used_by)
    current = _torch_internals.autograd_node_getter()
    seen = []

    def forward(x):
        seen.append(current())
        return x.sin() * 2

    x = torch.ones(3, requires_grad=True)
    if current() is not None:
        changed(api, used_by, "it is not None outside backward")
    out = torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=use_reentrant)
    out.sum().backward()
    inside_backward = []
    out = torch.utils.checkpoint.checkpoint(
        lambda x: (inside_backward.append(_torch_internals.in_backward()), x.cos())[1],
        x,
        use_reentrant=use_reentrant,
    )
    out.sum().backward()
    if inside_backward != [False, True]:
        changed(api, used_by, f"in_backward() in forward, recomputation: {inside_backward}")
    if len(seen) != 2 or seen[0] is not None or seen[1] is None:
        changed(
            api,
            used_by,
            f"expected [None (forward), a node (recomputation in backward)], got {seen!r}",
        )


# -- torch.func, tracing ----------------------------------------------------


def test_functorch_wrapped_tensor_check_sees_vmap_levels():
    api = "torch._C._functorch.is_functorch_wrapped_tensor"
    used_by = "capture.py (_tracing_transform): values under torch.func are not recorded"
    attribute(torch, "_C._functorch.is_functorch_wrapped_tensor", used_by)
    is_wrapped = _torch_internals.is_functorch_wrapped
    seen = []

    def inner(x):
        seen.append(is_wrapped(x))
        return x * 2

    torch.func.vmap(inner)(torch.ones(2, 3))
    if is_wrapped(torch.ones(2)) or seen != [True]:
        changed(api, used_by, f"plain tensor -> {is_wrapped(torch.ones(2))}, under vmap -> {seen}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_get_tracing_state_is_set_only_under_jit_trace():
    api = "torch._C._get_tracing_state"
    used_by = "capture.py (keep): a warning that torch.jit.trace freezes the capture"
    attribute(torch, "_C._get_tracing_state", used_by)
    seen = []

    def inner(x):
        seen.append(_torch_internals.jit_tracing())
        return x * 2

    torch.jit.trace(inner, torch.ones(2), check_trace=False)
    outside = _torch_internals.jit_tracing()
    if outside or not seen or not all(seen):
        changed(api, used_by, f"outside -> {outside}, under torch.jit.trace -> {seen}")


# -- torch function modes ---------------------------------------------------


def test_function_mode_stack_push_pop_and_get():
    used_by = "_modes.py (WatchMode, remove_mode) and attention.py: the recorders' mode"
    attribute(torch.overrides, "_push_mode", used_by)
    attribute(torch.overrides, "_pop_mode", used_by)
    attribute(torch.overrides, "_get_current_function_mode_stack", used_by)
    push, pop, stack = _torch_internals.push_mode, _torch_internals.pop_mode, _torch_internals.mode_stack
    first, second = FunctionLog(), FunctionLog()
    before = list(stack())
    push(first)
    push(second)
    try:
        now = stack()
        if [id(m) for m in now[-2:]] != [id(first), id(second)]:
            changed("torch.overrides._get_current_function_mode_stack", used_by,
                    "pushed modes are not its last entries, oldest first")
        torch.ones(1) + 1
        if not second.calls:
            changed("torch.overrides._push_mode", used_by,
                    "the mode pushed last is not the one torch calls")
    finally:
        top = pop()
        below = pop()
    if top is not second or below is not first:
        changed("torch.overrides._pop_mode", used_by, "it does not return the top mode")
    if [id(m) for m in stack()] != [id(m) for m in before]:
        changed("torch.overrides._get_current_function_mode_stack", used_by,
                "the stack is not back to what it was")


def test_a_mode_is_off_the_stack_inside_its_own_torch_function():
    used_by = "_modes.py (WatchMode): the weights are recomputed inside the mode"
    nested = []

    class Outer(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nested.append(any(m is self for m in torch.overrides._get_current_function_mode_stack()))
            return func(*args, **(kwargs or {}))

    with Outer():
        torch.ones(1) + 1
    if not nested or any(nested):
        changed("TorchFunctionMode.__torch_function__", used_by,
                "the mode is still on the stack while its __torch_function__ runs")


def test_disable_torch_function_hides_calls_from_every_mode():
    used_by = (
        "_torch_internals.torch_functions_unwatched: a recorder's recomputation is not the "
        "model's attention for another recorder's mode"
    )
    attribute(torch._C, "DisableTorchFunction", used_by)
    with FunctionLog() as outer, FunctionLog() as inner:
        with _torch_internals.torch_functions_unwatched():
            torch.ones(2, 3).softmax(-1)
        torch.ones(1) + 1
    if outer.calls[:1] != inner.calls[:1] or len(inner.calls) != 2:
        changed("torch._C.DisableTorchFunction", used_by,
                f"modes saw {len(outer.calls)} and {len(inner.calls)} calls, expected 1 each "
                "outside the block and none inside")


def _native_calls(monkeypatch, name):
    calls = []
    native = getattr(torch, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, name, spy)
    return calls


def test_multihead_attention_fast_path_is_taken_only_without_a_function_mode(monkeypatch):
    api = "nn.MultiheadAttention's fast path (torch._native_multi_head_attention)"
    used_by = "attention.py (_FAST_PATH_MODULES, _enter): the mode is taken off while it runs"
    calls = _native_calls(monkeypatch, "_native_multi_head_attention")
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        mha(x, x, x)
        if calls != ["_native_multi_head_attention"]:
            changed(api, used_by, "it is not taken in eval mode without grad and without a mode")
        log = FunctionLog()
        with log:
            mha(x, x, x)
    if calls != ["_native_multi_head_attention"]:
        changed(api, used_by, "it is taken while a torch function mode is active")
    if not any(func is torch.nn.functional.multi_head_attention_forward for func, _, _ in log.calls):
        changed("F.multi_head_attention_forward", used_by,
                "the slow path under a mode no longer calls it through __torch_function__")


def test_encoder_layer_fast_path_is_taken_only_without_a_function_mode(monkeypatch):
    api = "nn.TransformerEncoderLayer's fast path (torch._transformer_encoder_layer_fwd)"
    used_by = "attention.py (_FAST_PATH_MODULES, _enter)"
    calls = _native_calls(monkeypatch, "_transformer_encoder_layer_fwd")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        layer(x)
        taken_without = list(calls)
        with FunctionLog():
            layer(x)
    if taken_without != ["_transformer_encoder_layer_fwd"] or calls != taken_without:
        changed(api, used_by, f"taken without a mode: {bool(taken_without)}, "
                              f"with a mode: {len(calls) > len(taken_without)}")


def test_multihead_attention_qkv_same_embed_dim():
    used_by = "weights.py (module_weights): separate q/k/v projection weights"
    same = nn.MultiheadAttention(16, 4)
    separate = nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
    flag = "nn.MultiheadAttention._qkv_same_embed_dim"
    for module in (same, separate):
        if not isinstance(getattr(module, "_qkv_same_embed_dim", None), bool):
            changed(flag, used_by, "it is not a bool attribute")
    if _torch_internals.separate_projections(same):
        changed(flag, used_by, "separate projections reported for kdim == vdim == embed_dim")
    if not _torch_internals.separate_projections(separate):
        changed(flag, used_by, "no separate projections reported for kdim != embed_dim")
    if separate.in_proj_weight is not None or separate.q_proj_weight is None:
        changed("nn.MultiheadAttention.q_proj_weight", used_by,
                "separate projections are not q/k/v_proj_weight")


def test_module_hooks_with_kwargs_and_always_call():
    used_by = "attention.py (AttentionRecorder): every module's pre-hook and always-called hook"
    seen = []
    layer = nn.Linear(2, 2)

    def pre(module, args, kwargs):
        seen.append("pre")

    def post(module, args, kwargs, output):
        seen.append("post")

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True)]
    try:
        handles.append(layer.register_forward_hook(post, with_kwargs=True, always_call=True))
    except TypeError as error:
        changed("nn.Module.register_forward_hook(always_call=True)", used_by, str(error))
    try:
        layer(torch.ones(3))  # wrong shape: forward raises, the hook still runs
    except RuntimeError:
        pass
    for handle in handles:
        handle.remove()
    if seen != ["pre", "post"]:
        changed("nn.Module.register_forward_hook(always_call=True)", used_by,
                f"the hook did not run when forward raised: {seen}")


# -- Dynamo ------------------------------------------------------------------


# Called directly (a helper of this file would be a frame Dynamo compiles on its own).
_compiling = getattr(torch.compiler, "is_compiling", None)
if _compiling is None:  # torch < 2.3
    import torch._dynamo

    _compiling = torch._dynamo.is_compiling


@pytest.fixture
def dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield torch._dynamo
    torch._dynamo.reset()


def test_dynamo_skip_code_runs_a_frame_eagerly(dynamo):
    used_by = "capture.py (_run_eagerly_under_compile): a recorder never runs in a graph"
    import torch._dynamo.eval_frame as eval_frame

    attribute(eval_frame, "skip_code", used_by)
    seen = []

    def skipped(x):
        seen.append(_compiling())
        return x + 1

    _torch_internals.skip_in_dynamo(skipped.__code__)
    torch.compile(skipped, backend="eager")(torch.ones(2))
    if seen != [False]:
        changed("torch._dynamo.eval_frame.skip_code", used_by,
                f"the skipped frame was traced (compiling: {seen})")


def test_dynamo_honours_torchdynamo_disable_when_inlining(dynamo):
    used_by = "capture.py (_run_eagerly_under_compile): the disable attribute plus skip_code"
    seen = []

    def inner(x):
        seen.append(_compiling())
        return x + 1

    # What the package does: the attribute stops inlining (a graph break), the
    # skipped code makes the eager call that follows run without Dynamo.
    setattr(inner, _torch_internals.DYNAMO_DISABLE_ATTRIBUTE, True)
    _torch_internals.skip_in_dynamo(inner.__code__)

    def outer(x):
        return inner(x * 2) - 1

    out = torch.compile(outer, backend="eager")(torch.ones(2))
    if seen != [False] or not torch.equal(out, torch.full((2,), 2.0)):
        changed(f"the function attribute {_torch_internals.DYNAMO_DISABLE_ATTRIBUTE}", used_by,
                f"Dynamo inlined the marked function (compiling: {seen})")


def test_dynamo_input_codes_and_reset(dynamo):
    used_by = "capture.py (_forget_compiled_code): reset Dynamo when capture is switched"
    if _torch_internals.dynamo_compiled_anything():
        changed("torch._dynamo.convert_frame.input_codes.seen", used_by, "not empty after a reset")
    import torch._dynamo.convert_frame as convert_frame

    input_codes = attribute(convert_frame, "input_codes", used_by)
    if not hasattr(input_codes, "seen"):
        changed("torch._dynamo.convert_frame.input_codes.seen", used_by, "it no longer exists")

    def double(x):
        return x * 2

    torch.compile(double, backend="eager")(torch.ones(2))
    if not _torch_internals.dynamo_compiled_anything():
        changed("torch._dynamo.convert_frame.input_codes.seen", used_by,
                "it stays empty after a compilation")
    attribute(dynamo, "reset", used_by)
    _torch_internals.reset_dynamo()
    if _torch_internals.dynamo_compiled_anything():
        changed("torch._dynamo.reset", used_by, "it no longer empties input_codes.seen")


def test_dynamo_counts_the_graphs_it_compiles(dynamo):
    used_by = "attention.py (_warn_if_empty): whether Dynamo compiled graphs while recording"
    before = _torch_internals.dynamo_graphs_compiled()

    def triple(x):
        return x * 3

    torch.compile(triple, backend="eager")(torch.ones(2))
    if _torch_internals.dynamo_graphs_compiled() != before + 1:
        changed('torch._dynamo.utils.counters["stats"]["unique_graphs"]', used_by,
                f"one compiled function moved it from {before} to "
                f"{_torch_internals.dynamo_graphs_compiled()}")


def test_optimized_module_wraps_the_original_module():
    used_by = "attention.py (_unwrapped): capture_attention on a compiled model"
    model = nn.Linear(2, 2)
    compiled = torch.compile(model, backend="eager")
    import torch._dynamo.eval_frame as eval_frame

    attribute(eval_frame, "OptimizedModule", used_by)
    optimized = _torch_internals.compiled_module_type()
    if optimized is None or not isinstance(compiled, optimized):
        changed("torch._dynamo.eval_frame.OptimizedModule", used_by,
                f"torch.compile(module) returns a {type(compiled).__qualname__}")
    if getattr(compiled, "_orig_mod", None) is not model:
        changed("OptimizedModule._orig_mod", used_by, "it is not the compiled module")
    if _torch_internals.compiled_module_original(compiled) is not model:
        changed("OptimizedModule._orig_mod", used_by, "compiled_module_original is another module")


@pytest.mark.skipif(
    not _torch_internals.has(_torch_internals.SET_STANCE),
    reason="torch.compiler.set_stance is new in torch 2.6",
)
def test_force_eager_stance_runs_compiled_code_eagerly(dynamo):
    used_by = "attention.py (_compiled_code_runs_eagerly): capture_attention on compiled models"
    attribute(torch, "compiler.set_stance", used_by)
    seen = []

    def function(x):
        seen.append(_compiling())
        return x + 1

    compiled = torch.compile(function, backend="eager")
    compiled(torch.ones(2))
    stance = _torch_internals.force_eager()
    if stance is None:
        changed("torch.compiler.set_stance", used_by, "force_eager() gave no stance with Dynamo loaded")
    with stance:
        compiled(torch.ones(2))
    if seen[-1] is not False:
        changed("torch.compiler.set_stance('force_eager')", used_by,
                "compiled code still runs its graph under the stance")


def test_a_resume_function_after_a_graph_break_is_named_after_the_function(dynamo):
    used_by = "fused.py (_qualified_name): the cache key of an SDPA call after a graph break"
    names = []

    @torch.compiler.disable  # as fused.py's recorder, which reads its caller's frame
    def record():
        frame = sys._getframe(1)
        while frame.f_globals.get("__name__", "").startswith("torch"):  # the disable wrapper
            frame = frame.f_back
        names.append(frame.f_code.co_name)

    def forward(x):
        x = x + 1
        torch._dynamo.graph_break()
        record()
        return x * 2

    torch.compile(forward, backend="eager")(torch.ones(2))
    resumed = [_torch_internals.resumed_function_name(name) for name in names]
    if resumed != ["forward"]:
        changed("Dynamo's resume function name (torch_dynamo_resume_in_<name>_at_<line>)",
                used_by, f"code after the graph break ran as {names}")


@pytest.mark.parametrize("name, function", [
    ("torch_dynamo_resume_in_forward_at_142", "forward"), ("<resume in forward>", "forward"),
    ("forward", "forward"),
    ("torch_dynamo_resume_in_torch_dynamo_resume_in_forward_at_10_at_12", "forward"),
])
def test_resumed_function_name(name, function):
    assert _torch_internals.resumed_function_name(name) == function


def test_compiling_check_is_true_only_while_dynamo_traces(dynamo):
    used_by = "_modes.py (WatchMode): torch calls are counted only outside Dynamo's trace"
    check = _torch_internals.compiling_check()
    seen = []

    def function(x):
        seen.append(check())
        return x + 1

    torch.compile(function, backend="eager")(torch.ones(2))
    function(torch.ones(2))
    expected = [_torch_internals.has(_torch_internals.IS_COMPILING), False]
    if seen != expected:
        changed("torch.compiler.is_compiling", used_by,
                f"traced, eager: {seen}, expected {expected}")


def test_exporting_check_is_true_only_while_torch_export_traces(dynamo):
    if not _torch_internals.has(_torch_internals.IN_GRAPH_CAPTURE):
        pytest.skip(f"read only where get_local records in graphs (torch>=2.11); this is "
                    f"torch {torch.__version__}")
    used_by = ("capture.py (_GraphLink.traced): get_local records in torch.compile's graphs, "
               "never in torch.export's")
    check = _torch_internals.exporting_check()
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen.setdefault(self.context, []).append(check())
            return x + 1

    probe = Probe()
    for probe.context, run in (
        ("compile", lambda: torch.compile(probe, backend="eager")(torch.ones(2))),
        ("export", lambda: torch.export.export(probe, (torch.ones(2),))),
        ("eager", lambda: probe(torch.ones(2))),
    ):
        run()
    if not (seen["export"] and all(seen["export"]) and not any(seen["compile"] + seen["eager"])):
        changed("torch.compiler._is_exporting_flag", used_by,
                f"read while tracing: {seen}; expected True under torch.export only")


# -- transformers -------------------------------------------------------------


def test_transformers_attention_interface_and_sdpa_function():
    transformers = pytest.importorskip("transformers")
    used_by = ("fused.py (_SKIPPED_MODULES: the SDPA caller is the first frame outside "
               "transformers.integrations) and attention.py (_SEEN_IMPLEMENTATIONS)")
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as error:
        pytest.fail(f"transformers {transformers.__version__} moved its attention interface: "
                    f"{error} (visualizer relies on it in {used_by})", pytrace=False)
    if "sdpa" not in ALL_ATTENTION_FUNCTIONS or ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward:
        pytest.fail(f"transformers {transformers.__version__}: ALL_ATTENTION_FUNCTIONS['sdpa'] is not "
                    f"transformers.integrations.sdpa_attention.sdpa_attention_forward ({used_by})",
                    pytrace=False)
    if not sdpa_attention_forward.__module__.startswith("transformers.integrations"):
        pytest.fail(f"transformers {transformers.__version__}: sdpa_attention_forward now lives in "
                    f"{sdpa_attention_forward.__module__} ({used_by})", pytrace=False)


@pytest.mark.parametrize("masked", [False, True])
def test_transformers_grouped_query_layout_at_sdpa(masked):
    """A single-token GQA step reaches SDPA in one of the layouts the package undoes."""
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    used_by = "weights.py (unpack_grouped_query): transformers' GQA packing"
    heads, kv_heads, groups, keys, dim = 4, 2, 2, 5, 8

    class Module(nn.Module):
        num_key_value_groups = groups
        is_causal = False

        class config:  # noqa: N801 - what transformers' modules carry
            num_key_value_heads = kv_heads
            _attn_implementation = "sdpa"

    query = torch.randn(1, heads, 1, dim)
    key, value = torch.randn(1, kv_heads, keys, dim), torch.randn(1, kv_heads, keys, dim)
    mask = torch.ones(1, 1, 1, keys, dtype=torch.bool) if masked else None
    log = FunctionLog()
    with log, torch.no_grad():
        sdpa_attention_forward(Module(), query, key, value, mask, scaling=None, is_causal=False)
    calls = [c for c in log.calls if c[0] is torch.nn.functional.scaled_dot_product_attention]
    if len(calls) != 1:
        pytest.fail(f"transformers {transformers.__version__}: sdpa_attention_forward made "
                    f"{len(calls)} SDPA calls ({used_by})", pytrace=False)
    _, args, kwargs = calls[0]
    q, k = args[0], args[1]
    layouts = {
        "repeated keys": q.shape == (1, heads, 1, dim) and k.shape[1] == heads,
        "enable_gqa": q.shape == (1, heads, 1, dim) and k.shape[1] == kv_heads
        and kwargs.get("enable_gqa", False),
        "packed (B, Hkv, n_rep, E)": q.shape == (1, kv_heads, groups, dim) and k.shape[1] == kv_heads,
    }
    if not any(layouts.values()):
        pytest.fail(f"transformers {transformers.__version__}: a single-token GQA step reaches "
                    f"SDPA as query {tuple(q.shape)}, key {tuple(k.shape)}, kwargs "
                    f"{sorted(kwargs)}: none of {sorted(layouts)} ({used_by})", pytrace=False)


def test_transformers_modules_carry_what_the_package_reads():
    transformers = pytest.importorskip("transformers")
    used_by = "attention.py (_unseen_reason), weights.py (unpack_grouped_query)"
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    attention = model.model.layers[0].self_attn
    found = {
        "config._attn_implementation == 'sdpa'":
            getattr(attention.config, "_attn_implementation", None) == "sdpa",
        "num_key_value_groups == 2": getattr(attention, "num_key_value_groups", None) == 2,
        "config.num_key_value_heads == 2": getattr(attention.config, "num_key_value_heads", None) == 2,
    }
    missing = [name for name, ok in found.items() if not ok]
    if missing:
        pytest.fail(f"transformers {transformers.__version__}: LlamaAttention lacks {missing} "
                    f"({used_by})", pytrace=False)


def test_version_gates_are_checked_against_this_torch():
    """Each gate in _torch_internals agrees with the feature it stands for."""
    import torch.nn.functional as F

    def sdpa_takes_enable_gqa():
        q = torch.ones(1, 2, 2, 4)
        try:
            F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
        except TypeError:
            return False
        return True

    actual = {
        _torch_internals.CAUSAL_BIAS: _importable("torch.nn.attention.bias"),
        _torch_internals.IS_COMPILING: hasattr(torch.compiler, "is_compiling"),
        _torch_internals.SDPA_ENABLE_GQA: sdpa_takes_enable_gqa(),
        _torch_internals.SET_STANCE: hasattr(torch.compiler, "set_stance"),
    }
    # In-graph recording is the feature tests/test_compile.py exercises where this gate
    # opens; where it is closed, test_attention checks the forced-eager fallback.
    checked_by_their_own_tests = {_torch_internals.IN_GRAPH_CAPTURE}
    gates = [value for value in vars(_torch_internals).values()
             if isinstance(value, _torch_internals.Gate)]
    assert sorted(gates) == sorted(set(actual) | checked_by_their_own_tests), (
        "a gate in _torch_internals is not checked here"
    )
    wrong = {gate.feature: (_torch_internals.has(gate), present) for gate, present in actual.items()
             if _torch_internals.has(gate) != present}
    assert not wrong, f"torch {torch.__version__}: gate says, torch has: {wrong}"


@pytest.mark.parametrize("version, release", [
    ("2.1.2+cu121", (2, 1)), ("2.13.0", (2, 13)), ("2.5.0a0+git1234", (2, 5)), ("3.0.0rc1", (3, 0)),
    ("2.14.1+cu130", (2, 14)),
])
def test_torch_release_reads_major_and_minor(version, release):
    assert _torch_internals.torch_release(version) == release


def test_a_missing_feature_names_both_versions():
    assert _torch_internals.too_old(_torch_internals.Gate("feature X", (9, 3))) == (
        f"feature X needs torch>=9.3; this is torch {torch.__version__}"
    )


def test_causal_bias_offset():
    used_by = "weights.py (sdpa_weights): a CausalBias attn_mask"
    if _torch_internals.causal_bias_offset(torch.ones(3, 5), 3, 5) is not None:
        changed("torch.nn.attention.bias.CausalBias", used_by, "a plain mask has an offset")
    if not _torch_internals.has(_torch_internals.CAUSAL_BIAS):
        return
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    offsets = (_torch_internals.causal_bias_offset(causal_upper_left(3, 5), 3, 5),
               _torch_internals.causal_bias_offset(causal_lower_right(3, 5), 3, 5))
    if offsets != (0, 2):
        changed("torch.nn.attention.bias.CausalVariant", used_by,
                f"upper left, lower right offsets {offsets}, expected (0, 2)")


def _importable(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return name in sys.modules


@pytest.mark.skipif(
    not _torch_internals.has(_torch_internals.IN_GRAPH_CAPTURE),
    reason=f"sdpa_capture records inside graphs from torch 2.11; this is torch {torch.__version__}",
)
def test_dynamo_translators_show_the_traced_frames_and_graph_code_is_recognised():
    used_by = "fused.py (sdpa_capture inside compiled graphs): naming the caller at trace time"
    seen, graph_frames = [], []

    @torch._dynamo.assume_constant_result
    def traced():
        seen.append([(code.co_name, globals_.get("__name__"), owner)
                     for code, globals_, owner in _torch_internals.traced_frames()])
        return 0

    class Inner(nn.Module):
        def forward(self, x):
            return x + traced()

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x) * 2

    torch.compile(Outer(), backend="eager", fullgraph=True)(torch.ones(2))
    expected = [("forward", __name__, Inner), ("forward", __name__, Outer)]
    if not seen or seen[0][:2] != expected:
        changed("torch._dynamo InstructionTranslator.current_tx().output.current_tx / parent / "
                "f_code / f_globals / symbolic_locals", used_by,
                f"the traced frames read {seen[:1]}, expected {expected} first")

    @torch.compiler.disable
    def look():
        frame = sys._getframe(1)
        while frame.f_globals.get("__name__", "").startswith("torch") or (
            frame.f_code.co_name in ("look", "__torch_function__")
        ):
            frame = frame.f_back
        graph_frames.append(_torch_internals.is_dynamo_graph_frame(frame))

    class Mode(TorchFunctionMode):
        # Traced into the graph doing nothing; run by the graph's code, it looks.
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.sin and not torch.compiler.is_compiling():
                look()
            return func(*args, **(kwargs or {}))

    def sine(x):
        return torch.sin(x) + 1

    compiled = torch.compile(sine, backend="eager")
    compiled(torch.ones(2))
    user_graph = torch.fx.symbolic_trace(sine)  # a user's own FX graph
    with Mode():
        compiled(torch.ones(2))  # the eager backend runs the graph's Python code
        user_graph(torch.ones(2))
    if graph_frames != [True, False]:
        changed("Dynamo's GraphModule meta 'dynamo_flat_name_to_original_fqn' / "
                "<eval_with_key> file names", "fused.py (_caller)",
                f"graph frames recognised as {graph_frames}, expected [True, False]")

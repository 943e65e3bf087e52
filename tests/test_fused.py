"""Attention weights from F.scaled_dot_product_attention equal the eager path's.

Oracles: the eager `softmax` path of the same module (captured by get_local),
Hugging Face's eager `output_attentions`, and PyTorch's documented reference
implementation of SDPA. Invariants: the model's output (and its gradients)
are bitwise the same with capture on and off; selected rows and heads are
the rows and heads of the full matrix; weights @ value = output.
"""

import copy
import math
import re
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from visualizer import VisualizerError, _torch_internals, get_local, load_cache, save_cache
from visualizer.fused import SdpaCapture, sdpa_capture

HAS_CAUSAL_BIAS = _torch_internals.has(_torch_internals.CAUSAL_BIAS)
HAS_ENABLE_GQA = _torch_internals.has(_torch_internals.SDPA_ENABLE_GQA)
if HAS_CAUSAL_BIAS:
    from torch.nn.attention.bias import causal_lower_right

needs_causal_bias = pytest.mark.skipif(
    not HAS_CAUSAL_BIAS, reason="torch.nn.attention.bias (CausalBias) is new in torch 2.3"
)
needs_enable_gqa = pytest.mark.skipif(
    not HAS_ENABLE_GQA, reason="F.scaled_dot_product_attention's enable_gqa is new in torch 2.5"
)


def _sdpa_runs(dtype=torch.float32, **kwargs):
    """SDPA's CPU output for a tiny call, or None where this torch rejects the call."""
    q = torch.ones(1, 1, 2, 4, dtype=dtype)
    try:
        return F.scaled_dot_product_attention(q, q, q, **kwargs)
    except RuntimeError:
        return None


# Kernel behaviours older torch lacks (torch 2.1.2 has none of them; 2.6.0 has all):
# a query row whose every key is masked outputs zeros (older: NaN), attn_mask
# together with is_causal=True, float16 SDPA on the CPU.
_masked_row = _sdpa_runs(attn_mask=torch.tensor([[True, True], [False, False]]))
SDPA_ZEROS_MASKED_ROWS = bool(_masked_row is not None and (_masked_row[..., 1, :] == 0).all())
SDPA_MASK_WITH_CAUSAL = _sdpa_runs(attn_mask=torch.ones(2, 2, dtype=torch.bool), is_causal=True) is not None
SDPA_HALF_ON_CPU = _sdpa_runs(torch.float16) is not None


def _sdpa_gqa_mask_with_causal():
    """Whether attn_mask, is_causal and enable_gqa go together (no: torch 2.8.0; yes: 2.13.0)."""
    if not HAS_ENABLE_GQA:
        return False
    q, k = torch.ones(1, 2, 2, 4), torch.ones(1, 1, 2, 4)
    try:
        F.scaled_dot_product_attention(
            q, k, k, attn_mask=torch.ones(2, 2, dtype=torch.bool), is_causal=True, enable_gqa=True
        )
    except RuntimeError:
        return False
    return True


SDPA_GQA_MASK_WITH_CAUSAL = _sdpa_gqa_mask_with_causal()
needs_zeros_for_masked_rows = pytest.mark.skipif(
    not SDPA_ZEROS_MASKED_ROWS,
    reason=f"torch {torch.__version__}'s SDPA outputs NaN for a fully masked query row (zeros from torch 2.5)",
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("capture_left_off")


def assert_close(actual, expected, atol=1e-6, rtol=1e-5, what="weights"):
    actual, expected = as_tensor(actual), as_tensor(expected)
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    difference = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol), (
        f"{what}: max difference {difference}"
    )


def as_tensor(value):
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value.detach().cpu()


# -- a timm-style attention module: one flag switches fused and eager ----------


@get_local("attn")
def eager_attention(q, k, v, attn_mask, is_causal, attn_drop):
    """timm's explicit path: the attention matrix is the local `attn`."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if is_causal:
        causal = torch.ones(attn.shape[-2:], dtype=torch.bool, device=q.device).tril()
        attn = attn.masked_fill(~causal, -math.inf)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn = attn.masked_fill(~attn_mask, -math.inf)
    elif attn_mask is not None:
        attn = attn + attn_mask
    attn = attn.softmax(dim=-1)
    return attn_drop(attn) @ v


class TimmAttention(nn.Module):
    """timm's `Attention`, plus GQA: `fused_attn` picks F.sdpa or the explicit path."""

    def __init__(self, dim, num_heads, num_kv_heads=None, attn_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = True
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.num_kv_heads * self.head_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        batch, tokens, _ = x.shape
        q = self.q(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(batch, tokens, 2, self.num_kv_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
                # Passed only for GQA: torch < 2.5 has no enable_gqa argument.
                **({"enable_gqa": True} if self.num_kv_heads != self.num_heads else {}),
            )
        else:
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            x = eager_attention(q, k, v, attn_mask, is_causal, self.attn_drop)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, -1))


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads, **attention):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, num_heads, **attention)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    @get_local("residual")
    def forward(self, x, attn_mask=None, is_causal=False):
        residual = x + self.attn(self.norm(x), attn_mask, is_causal)
        return residual + self.mlp(residual)


class Encoder(nn.Module):
    def __init__(self, dim=32, num_heads=4, depth=2, **attention):
        super().__init__()
        self.blocks = nn.ModuleList(TimmBlock(dim, num_heads, **attention) for _ in range(depth))

    def forward(self, x, attn_mask=None, is_causal=False):
        for block in self.blocks:
            x = block(x, attn_mask, is_causal)
        return x

    def set_fused(self, fused):
        for block in self.blocks:
            block.attn.fused_attn = fused
        return self


def fused_and_eager(device="cpu", **attention):
    torch.manual_seed(0)
    fused = Encoder(**attention).to(device).eval().set_fused(True)
    return fused, copy.deepcopy(fused).set_fused(False)


BATCH, TOKENS, DIM, HEADS = 3, 9, 32, 4
# The cache keys: the qualified names of the functions that record.
ATTENTION_KEY, BLOCK_KEY = "TimmAttention.forward", "TimmBlock.forward"


def padding_mask(device, tokens=TOKENS):
    keep = torch.ones(BATCH, 1, 1, tokens, dtype=torch.bool, device=device)
    keep[1, ..., -3:] = False
    return keep


def additive_mask(device, tokens=TOKENS):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, HEADS, tokens, tokens, generator=generator).to(device)


CASES = {
    "plain": ({}, lambda device, tokens=TOKENS: {}),
    "bool padding mask": ({}, lambda device, tokens=TOKENS: {
        "attn_mask": padding_mask(device, tokens)}),
    "additive float mask": ({}, lambda device, tokens=TOKENS: {
        "attn_mask": additive_mask(device, tokens)}),
    "causal": ({}, lambda device, tokens=TOKENS: {"is_causal": True}),
    "gqa causal": ({"num_kv_heads": 2}, lambda device, tokens=TOKENS: {"is_causal": True}),
    "gqa bool mask": ({"num_kv_heads": 1}, lambda device, tokens=TOKENS: {
        "attn_mask": padding_mask(device, tokens)}),
}


def case_params(names):
    """The CASES names as parameters; the GQA ones skip on torch < 2.5."""
    return [
        pytest.param(name, marks=needs_enable_gqa) if CASES[name][0].get("num_kv_heads") else name
        for name in names
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", case_params(CASES))
# 300 tokens: maps of 4.1 MiB, which the CPU computes into buffer-pool memory.
@pytest.mark.parametrize("tokens", [TOKENS, 300])
def test_fused_weights_equal_eager_attn_layer_by_layer(case, device, tokens):
    attention, call = CASES[case]
    fused, eager = fused_and_eager(device, **attention)
    x = torch.randn(BATCH, tokens, DIM, device=device)
    kwargs = call(device, tokens)
    with torch.no_grad():
        plain_output = fused(x, **kwargs)
        with get_local.capture() as eager_cache:
            eager(x, **kwargs)
        with sdpa_capture.capture() as fused_cache:
            captured_output = fused(x, **kwargs)
    assert torch.equal(captured_output, plain_output), "capture changed the model's output"
    expected, captured = eager_cache["eager_attention"], fused_cache[ATTENTION_KEY]
    assert len(captured) == len(expected) == 2
    # GPU kernels differ from eager matmuls in the last bits, which layer 2 sees.
    atol, rtol = (1e-6, 1e-5) if device == "cpu" else (1e-5, 1e-4)
    for layer, (weights, attn) in enumerate(zip(captured, expected)):
        assert weights.shape == (BATCH, HEADS, tokens, tokens)
        assert_close(weights, attn, atol=atol, rtol=rtol, what=f"{case}, layer {layer}")


@needs_enable_gqa
def test_output_and_gradients_unchanged_with_grad_enabled():
    fused, _ = fused_and_eager(num_kv_heads=2)
    x = torch.randn(BATCH, TOKENS, DIM, requires_grad=True)
    plain = fused(x, is_causal=True)
    plain_grads = torch.autograd.grad(plain.square().sum(), [x, *fused.parameters()])
    with sdpa_capture.capture(keep_on_device=True) as cache:
        captured = fused(x, is_causal=True)
    captured_grads = torch.autograd.grad(captured.square().sum(), [x, *fused.parameters()])
    assert torch.equal(captured, plain)
    assert all(torch.equal(a, b) for a, b in zip(captured_grads, plain_grads))
    assert all(not weights.requires_grad for weights in cache[ATTENTION_KEY])


# -- selection before computation ------------------------------------------


SELECTIONS = [
    ({"rows": 0}, (slice(None), [0])),
    ({"rows": [0, -1, 4]}, (slice(None), [0, TOKENS - 1, 4])),
    ({"rows": slice(2, None, 3)}, (slice(None), list(range(TOKENS))[2::3])),
    ({"heads": [3, 1]}, ([3, 1], slice(None))),
    ({"rows": -2, "heads": slice(1, 3)}, ([1, 2], [TOKENS - 2])),
]


@pytest.mark.parametrize(
    "case", case_params(["bool padding mask", "additive float mask", "gqa causal", "gqa bool mask"])
)
@pytest.mark.parametrize("selection, index", SELECTIONS)
def test_selected_rows_and_heads_equal_those_of_the_full_matrix(case, selection, index):
    attention, call = CASES[case]
    fused, _ = fused_and_eager(**attention)
    x = torch.randn(BATCH, TOKENS, DIM)
    with torch.no_grad():
        with sdpa_capture.capture() as full:
            fused(x, **call("cpu"))
        with sdpa_capture.capture(**selection) as selected:
            fused(x, **call("cpu"))
    heads, rows = index
    for whole, part in zip(full[ATTENTION_KEY], selected[ATTENTION_KEY]):
        expected = whole[:, heads][:, :, rows]
        assert_close(part, expected, atol=1e-7, rtol=1e-6, what=f"{case}, {selection}")


# -- raw SDPA calls against PyTorch's documented reference -----------------


def reference_weights(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The weights of PyTorch's documented reference implementation, in float64.

    Two departures from the docs, both what the CPU kernel does: a mask given
    with is_causal is combined with it, and a query with every key masked
    gets zero weights (the kernel's output for it is zero) instead of NaN.
    """
    query, key = query.double(), key.double()
    length, source_length = query.size(-2), key.size(-2)
    scale_factor = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    attn_bias = torch.zeros(length, source_length, dtype=torch.float64)
    if is_causal:
        keep = torch.ones(length, source_length, dtype=torch.bool).tril(diagonal=0)
        attn_bias.masked_fill_(keep.logical_not(), float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_bias = torch.where(attn_mask, attn_bias, float("-inf"))
    elif attn_mask is not None:
        attn_bias = attn_mask.double() + attn_bias
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
    attn_weight = query @ key.transpose(-2, -1) * scale_factor
    attn_weight = torch.softmax(attn_weight + attn_bias, dim=-1)
    return attn_weight.nan_to_num(0.0)


def call_sdpa(*args, **kwargs):
    return F.scaled_dot_product_attention(*args, **kwargs)


@st.composite
def sdpa_calls(draw):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3] if HAS_ENABLE_GQA else [1]))  # enable_gqa: torch>=2.5
    heads = kv_heads * group
    length, source_length = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    width = draw(st.sampled_from([2, 4, 8]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    query = torch.randn(batch, heads, length, width, generator=generator)
    key, value = torch.randn(2, batch, kv_heads, source_length, width, generator=generator)
    # Older torch rejects attn_mask with is_causal=True (2.1.2; 2.8.0 with enable_gqa):
    # then is_causal comes without a mask.
    kwargs = {"is_causal": draw(st.booleans())}
    if group > 1:
        kwargs["enable_gqa"] = True
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 2.0))
    mask_with_causal = SDPA_GQA_MASK_WITH_CAUSAL if group > 1 else SDPA_MASK_WITH_CAUSAL
    masks = ["none", "bool", "float"] if mask_with_causal or not kwargs["is_causal"] else ["none"]
    mask_kind = draw(st.sampled_from(masks))
    if mask_kind != "none":
        shape = draw(
            st.sampled_from(
                [
                    (length, source_length),
                    (batch, 1, length, source_length),
                    (1, heads, length, source_length),
                    (batch, 1, 1, source_length),
                    (1, source_length),
                ]
            )
        )
        if mask_kind == "bool":
            kwargs["attn_mask"] = torch.rand(shape, generator=generator) < 0.7
        else:
            kwargs["attn_mask"] = torch.randn(shape, generator=generator)
    rows = draw(st.lists(st.integers(-length, length - 1), min_size=1, max_size=3))
    selected_heads = draw(st.lists(st.integers(-heads, heads - 1), min_size=1, max_size=3))
    return query, key, value, kwargs, rows, selected_heads


@settings(max_examples=60, deadline=None)
@given(sdpa_calls())
def test_weights_equal_documented_reference_and_reproduce_output(call):
    query, key, value, kwargs, rows, heads = call
    plain = call_sdpa(query, key, value, **kwargs)
    # Fully masked rows are NaN on torch < 2.5 (zeros since): covered where they are zeros.
    assume(SDPA_ZEROS_MASKED_ROWS or bool(torch.isfinite(plain).all()))
    with sdpa_capture.capture() as full:
        output = call_sdpa(query, key, value, **kwargs)
    with sdpa_capture.capture(rows=rows, heads=heads) as selected:
        call_sdpa(query, key, value, **kwargs)
    assert torch.equal(output, plain)
    (weights,) = full["call_sdpa"]
    expected = reference_weights(query, key, **kwargs)
    assert_close(weights, expected, atol=1e-6)
    if kwargs.get("enable_gqa"):
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    assert_close(torch.from_numpy(weights) @ value, output, atol=1e-5, what="weights @ value")
    (part,) = selected["call_sdpa"]
    assert_close(part, expected[:, heads][:, :, rows], atol=1e-6, what="selected rows/heads")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, atol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3), (torch.float64, 1e-12)]
)
def test_any_float_dtype_records_in_the_query_dtype(dtype, atol, device):
    if device == "cpu" and dtype == torch.float16 and not SDPA_HALF_ON_CPU:
        pytest.skip(f"torch {torch.__version__} has no float16 SDPA on the CPU")
    generator = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(3, 2, 4, 7, 16, generator=generator).to(device, dtype)
    mask = torch.randn(1, 4, 7, 7, generator=generator).to(device, dtype)
    with sdpa_capture.capture(keep_on_device=True) as cache:
        call_sdpa(query, key, value, attn_mask=mask)
    (weights,) = cache["call_sdpa"]
    assert weights.dtype == dtype and weights.device.type == device
    assert_close(
        weights, reference_weights(query.cpu(), key.cpu(), attn_mask=mask.cpu()), atol=atol
    )


@needs_zeros_for_masked_rows
def test_fully_masked_rows_record_zeros_as_the_kernel_outputs_zeros():
    query, key, value = torch.randn(3, 1, 2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    with sdpa_capture.capture() as cache:
        output = call_sdpa(query, key, value, attn_mask=mask)
    (weights,) = cache["call_sdpa"]
    assert np.all(weights[..., 2, :] == 0) and torch.all(output[..., 2, :] == 0)
    assert np.allclose(weights[..., [0, 1, 3], :].sum(-1), 1, atol=1e-6)


@needs_causal_bias
def test_causal_bias_lower_right_is_aligned_to_the_last_key():
    query = torch.randn(1, 2, 3, 8)
    key, value = torch.randn(2, 1, 2, 5, 8)
    with sdpa_capture.capture(rows=[0, 2]) as cache:
        output = call_sdpa(query, key, value, attn_mask=causal_lower_right(3, 5))
    keep = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)
    expected = reference_weights(query, key, attn_mask=keep)
    assert_close(cache["call_sdpa"][0], expected[:, :, [0, 2]])
    assert_close(torch.from_numpy(cache["call_sdpa"][0]) @ value, output[:, :, [0, 2]], atol=1e-5)


@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="code.co_qualname is new in Python 3.11; before it a nested function's key is its name",
)
def test_key_is_the_qualified_name_of_the_calling_function():
    query = torch.randn(1, 2, 3, 4)

    def nested_attention(x):
        return F.scaled_dot_product_attention(x, x, x)

    with sdpa_capture.capture() as cache:
        nested_attention(query)
        call_sdpa(query, query, query)
    assert list(cache) == [
        "test_key_is_the_qualified_name_of_the_calling_function.<locals>.nested_attention",
        "call_sdpa",
    ]


def test_multihead_attention_without_weights_is_not_seen_and_says_so():
    attention = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)

    def self_attention_block(x):
        return attention(x, x, x, need_weights=False)[0]

    warning = "self_attention_block ran nn.MultiheadAttention"
    with pytest.warns(RuntimeWarning, match="none of them F.scaled_dot_product_attention"):
        with sdpa_capture.capture() as cache, pytest.warns(
            RuntimeWarning, match=warning
        ) as caught:
            self_attention_block(x)
    assert cache == {}
    # It points at the user's code, not at visualizer/fused.py or torch.
    assert [w.filename for w in caught if warning in str(w.message)] == [__file__]


# -- Hugging Face transformers ----------------------------------------------


def hf_pair(config_class, model_class, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    models = [
        getattr(transformers, model_class)(
            getattr(transformers, config_class)(**config, attn_implementation=implementation)
        ).eval()
        for implementation in ("sdpa", "eager")
    ]
    models[1].load_state_dict(models[0].state_dict())
    return models


def assert_attention_module_forward(key, model):
    """The key names the forward of one of the model's attention modules.

    (transformers 5 calls SDPA from e.g. ViTAttention.forward, 4.x from
    ViTSelfAttention.forward, both through `sdpa_attention_forward`.)
    """
    forwards = {f"{type(module).__qualname__}.forward" for module in model.modules()}
    assert key in forwards and key.endswith("Attention.forward"), key


def test_hugging_face_vit_sdpa_weights_equal_eager_output_attentions():
    sdpa, eager = hf_pair(
        "ViTConfig",
        "ViTModel",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    )
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = eager(pixels, output_attentions=True).attentions
        plain = sdpa(pixels).last_hidden_state
        with sdpa_capture.capture() as cache:
            captured = sdpa(pixels).last_hidden_state
        with sdpa_capture.capture(rows=0) as cls_cache:
            sdpa(pixels)
    assert torch.equal(captured, plain)
    (key,) = cache
    assert_attention_module_forward(key, sdpa)
    assert len(cache[key]) == len(expected) == 2
    for layer, (weights, attentions) in enumerate(zip(cache[key], expected)):
        assert_close(weights, attentions, what=f"ViT layer {layer}")
        assert_close(
            cls_cache[key][layer], attentions[:, :, :1], what=f"ViT CLS row, layer {layer}"
        )


def _transformers_release():
    import transformers

    return tuple(int(part) for part in transformers.__version__.split(".")[:2])


@pytest.mark.parametrize("padded", [False, True])
def test_hugging_face_llama_gqa_causal_weights_equal_eager_output_attentions(padded):
    transformers = pytest.importorskip("transformers")
    if padded and (_transformers_release() < (4, 53) or not HAS_ENABLE_GQA):
        # Older transformers passes an additive finfo.min mask (and on torch < 2.5
        # unmasks fully masked rows itself): the kernel gives a padded row a uniform row.
        pytest.skip(
            f"transformers {transformers.__version__} with torch {torch.__version__} gives SDPA "
            "no fully masked rows (needs transformers>=4.53 and torch>=2.5)"
        )
    # Without padding transformers calls SDPA with is_causal and enable_gqa;
    # with padding, with a boolean mask and key/value heads it repeated itself.
    sdpa, eager = hf_pair(
        "LlamaConfig",
        "LlamaForCausalLM",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=64,
    )
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask = mask if padded else None
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask, output_attentions=True).attentions
        plain = sdpa(ids, attention_mask=mask).logits
        with sdpa_capture.capture() as cache:
            captured = sdpa(ids, attention_mask=mask).logits
    assert torch.equal(captured, plain)
    (key,) = cache
    assert_attention_module_forward(key, sdpa)
    for layer, (weights, attentions) in enumerate(zip(cache[key], expected)):
        if padded:
            # A padded query sees no key: the kernel gives it zero weights and
            # output, where eager's additive finfo.min mask gives a uniform row.
            assert np.all(weights[1, :, :2] == 0)
            weights, attentions = weights[:, :, 2:], attentions[:, :, 2:]
        assert_close(weights, attentions, what=f"Llama layer {layer}")


# -- dropout, storage policies, nesting, state, errors ----------------------


def test_dropout_records_weights_before_dropout_and_warns_once():
    # One layer: a second layer's input would depend on the first one's dropout.
    fused, eager = fused_and_eager(attn_drop=0.5, depth=1)
    x = torch.randn(BATCH, TOKENS, DIM)
    with torch.no_grad(), get_local.capture() as eager_cache:
        eager(x)
    fused.train()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sdpa_capture.capture() as cache:
            fused(x)
            fused(x)
    messages = [str(w.message) for w in caught if "dropout" in str(w.message)]
    assert len(messages) == 1 and "BEFORE dropout" in messages[0] and ATTENTION_KEY in messages[0]
    assert len(cache[ATTENTION_KEY]) == 2
    for weights in cache[ATTENTION_KEY]:
        assert_close(weights, eager_cache["eager_attention"][0])


def test_storage_policies_apply_and_save_load_round_trips(tmp_path):
    fused, _ = fused_and_eager()
    x = torch.randn(BATCH, TOKENS, DIM)
    with torch.no_grad():
        with sdpa_capture.capture() as as_numpy:
            fused(x)
        with sdpa_capture.capture(keep_on_device=True, dtype="float16") as as_tensors:
            fused(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with sdpa_capture.capture(max_entries=1) as bounded:
                fused(x)
                assert sdpa_capture.cache is bounded and get_local.dropped == {ATTENTION_KEY: 1}
    assert all(isinstance(w, np.ndarray) and w.dtype == np.float32 for w in as_numpy[ATTENTION_KEY])
    assert all(w.dtype == torch.float16 for w in as_tensors[ATTENTION_KEY])
    assert len(bounded[ATTENTION_KEY]) == 1
    assert np.array_equal(bounded[ATTENTION_KEY][0], as_numpy[ATTENTION_KEY][1])
    save_cache(as_numpy, tmp_path / "attn.npz")
    loaded = load_cache(tmp_path / "attn.npz")
    assert all(np.array_equal(a, b) for a, b in zip(loaded[ATTENTION_KEY], as_numpy[ATTENTION_KEY]))


def test_activate_uses_the_storage_policy_in_force_and_warns_for_detach_false():
    fused, _ = fused_and_eager()
    with get_local.capture(keep_on_device=True, detach=False) as cache:
        sdpa_capture.activate(rows=0)
        with pytest.warns(RuntimeWarning, match="not part of the model's autograd graph"):
            fused(torch.randn(BATCH, TOKENS, DIM))
        sdpa_capture.deactivate()
    weights = cache[ATTENTION_KEY]
    assert len(weights) == 2 and all(
        isinstance(w, torch.Tensor) and w.shape == (BATCH, HEADS, 1, TOKENS) for w in weights
    )


def test_nested_with_get_local_both_record_into_the_inner_cache():
    fused, _ = fused_and_eager()
    x = torch.randn(BATCH, TOKENS, DIM)
    with torch.no_grad(), get_local.capture() as outer:
        with sdpa_capture.capture(rows=0) as inner:
            fused(x)
        assert get_local.is_activate and not sdpa_capture.is_active
        fused(x)
    assert sorted(inner) == sorted([ATTENTION_KEY, BLOCK_KEY])
    assert len(inner[ATTENTION_KEY]) == len(inner[BLOCK_KEY]) == 2
    assert outer[BLOCK_KEY] and not outer.get(ATTENTION_KEY)
    assert not get_local.is_activate


def test_context_manager_leaves_get_local_off_and_restores_on_error():
    fused, _ = fused_and_eager()
    cache_before = get_local.cache
    with pytest.raises(RuntimeError, match="inside the block"), sdpa_capture.capture() as cache:
        assert sdpa_capture.is_active and not get_local.is_activate
        with torch.no_grad():
            fused(torch.randn(BATCH, TOKENS, DIM))
        raise RuntimeError("inside the block")
    assert len(cache[ATTENTION_KEY]) == 2
    assert not sdpa_capture.is_active and get_local.cache is cache_before
    assert torch.overrides._get_current_function_mode_stack() == []


def test_context_manager_inside_activate_restores_the_previous_selection():
    fused, _ = fused_and_eager()
    x = torch.randn(BATCH, TOKENS, DIM)
    with get_local.capture() as cache, torch.no_grad():
        get_local.deactivate()
        sdpa_capture.activate(rows=0)
        with sdpa_capture.capture(heads=[1]) as inner:
            fused(x)
        fused(x)
    assert [w.shape for w in inner[ATTENTION_KEY]] == [(BATCH, 1, TOKENS, TOKENS)] * 2
    assert [w.shape for w in cache[ATTENTION_KEY]] == [(BATCH, HEADS, 1, TOKENS)] * 2
    assert sdpa_capture.is_active


def test_out_of_range_rows_raise_naming_function_argument_range_and_value():
    fused, _ = fused_and_eager()
    with pytest.raises(VisualizerError) as error, sdpa_capture.capture(rows=[0, 99]):
        fused(torch.randn(BATCH, TOKENS, DIM))
    message = str(error.value)
    assert ATTENTION_KEY in message and "rows=[0, 99]" in message
    assert f"[-{TOKENS}, {TOKENS})" in message and "got [99]" in message
    assert not sdpa_capture.is_active


@pytest.mark.parametrize(
    "selection, query_shape, expected",
    [
        ({"heads": 4}, (1, 4, 3, 8), r"heads=4 is out of range for the 4 query heads .* \[-4, 4\)"),
        ({"rows": slice(5, None)}, (1, 4, 3, 8), "rows=slice.* selects none of the 3 query rows"),
        ({"heads": 0}, (4, 3, 8), "3-D query"),
    ],
)
def test_bad_selection_for_the_call_raises(selection, query_shape, expected):
    query = torch.randn(query_shape)
    with pytest.raises(VisualizerError, match=expected), sdpa_capture.capture(**selection):
        call_sdpa(query, query, query)


@pytest.mark.parametrize(
    "selection", [{"rows": "0"}, {"rows": []}, {"heads": True}, {"heads": [0.5]}]
)
def test_bad_selection_type_raises_at_activation(selection):
    with pytest.raises(VisualizerError, match="sdpa_capture: (rows|heads) must"):
        sdpa_capture.activate(**selection)
    assert not sdpa_capture.is_active


class CountingMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def test_other_torch_function_modes_compose_and_deactivate_keeps_them():
    query = torch.randn(1, 2, 3, 4)
    counting = CountingMode()
    with sdpa_capture.capture() as cache, counting:
        call_sdpa(query, query, query)
        sdpa_capture.deactivate()
        call_sdpa(query, query, query)
        assert torch.overrides._get_current_function_mode_stack() == [counting]
    assert counting.calls == 2 and len(cache["call_sdpa"]) == 1


def test_a_capture_object_shares_the_store_of_its_get_local():
    separate = SdpaCapture(type(get_local)())
    query = torch.randn(1, 2, 3, 4)
    with separate.capture() as cache:
        call_sdpa(query, query, query)
    assert len(cache["call_sdpa"]) == 1 and "call_sdpa" not in get_local.cache
    assert sdpa_capture.cache is get_local.cache


# Dynamo before torch 2.6 runs the recording mode on its fake tensors (checked: 2.1.2).
DYNAMO_TRACES_MODES = _torch_internals.torch_release() >= (2, 6)


@pytest.mark.skipif(
    not DYNAMO_TRACES_MODES,
    reason=f"torch {torch.__version__}: Dynamo traces torch function modes from torch 2.6",
)
def test_records_under_torch_compile():
    """In the graph from torch 2.11 (tests/test_compile.py), between graphs on 2.6-2.10."""
    fused, _ = fused_and_eager(num_kv_heads=2)
    compiled = torch.compile(fused, backend="eager")
    x = torch.randn(BATCH, TOKENS, DIM)
    with torch.no_grad():
        with sdpa_capture.capture(rows=0) as expected:
            fused(x, is_causal=True)
        with sdpa_capture.capture(rows=0) as cache:
            compiled(x, is_causal=True)
    assert len(cache[ATTENTION_KEY]) == 2
    for weights, reference in zip(cache[ATTENTION_KEY], expected[ATTENTION_KEY]):
        assert_close(weights, reference)


@pytest.mark.skipif(DYNAMO_TRACES_MODES, reason="torch>=2.6 records under torch.compile")
def test_recording_under_torch_compile_before_torch_2_6_is_refused_naming_the_version():
    fused, _ = fused_and_eager()
    compiled = torch.compile(fused, backend="eager")
    message = (
        f"sdpa_capture: cannot record inside torch.compile on torch {torch.__version__}: "
        "Dynamo runs the recording on fake tensors"
    )
    # Dynamo wraps what the recording raised in its own error, message included.
    with torch.no_grad(), sdpa_capture.capture(), pytest.raises(Exception, match=re.escape(message)):
        compiled(torch.randn(BATCH, TOKENS, DIM), is_causal=True)


def test_get_local_left_on_a_fused_forward_gives_one_map_per_call():
    """timm's situation: @get_local('attn') kept on a forward whose fused path binds no attn."""
    from examples.toy_vit import VisionTransformer

    torch.manual_seed(0)
    eager = VisionTransformer(img_size=(16, 16), patch_size=4, depth=3).eval()
    fused = VisionTransformer(img_size=(16, 16), patch_size=4, depth=3, fused=True).eval()
    fused.load_state_dict(eager.state_dict())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with get_local.capture() as eager_cache:
            eager(images)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to say: one map per call
            with get_local.capture() as both:
                with sdpa_capture.capture() as inner:
                    fused(images)
        # Without the fused capture, get_local alone says the map was not bound.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with get_local.capture() as alone:
                fused(images)
    # The sdpa block's captures went to its own dict; the outer one got no MISSING.
    assert all(entries == [] for entries in both.values())
    maps = inner["Attention.forward"]
    assert len(maps) == 3
    for got, want in zip(maps, eager_cache["Attention.forward"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    from visualizer import MISSING

    assert alone["Attention.forward"] == [MISSING] * 3


def test_ranks_leave_other_processes_off():
    """A plain single process is rank 0: ranks=[1] records nothing, ranks=[0] records."""
    q = torch.randn(1, 2, 3, 4)
    sdpa_capture.activate(ranks=1)
    assert not sdpa_capture.is_active
    with sdpa_capture.capture(ranks=[1]) as cache:
        assert not sdpa_capture.is_active
        F.scaled_dot_product_attention(q, q, q)
    assert cache == {}
    with sdpa_capture.capture(ranks=[0, 1]) as cache:
        F.scaled_dot_product_attention(q, q, q)
    assert [entry.shape for entry in cache["test_ranks_leave_other_processes_off"]] == [
        (1, 2, 3, 3)
    ]
    with pytest.raises(VisualizerError, match="sdpa_capture: ranks must be None, an int"):
        sdpa_capture.activate(ranks="0")


def test_capture_block_restores_the_entry_state_even_if_switched_inside():
    key = "test_capture_block_restores_the_entry_state_even_if_switched_inside"
    q = torch.randn(1, 1, 3, 2)
    sdpa_capture.activate(rows=0)
    with sdpa_capture.capture(rows=1):
        sdpa_capture.deactivate()
    assert sdpa_capture.is_active
    F.scaled_dot_product_attention(q, q, q)  # on again, with the entry's rows=0
    assert sdpa_capture.cache[key][-1].shape == (1, 1, 1, 3)
    sdpa_capture.deactivate()
    with sdpa_capture.capture():
        sdpa_capture.activate()
    assert not sdpa_capture.is_active


def _attend(q):
    return F.scaled_dot_product_attention(q, q, q)


def test_capture_blocks_in_two_threads_each_get_their_own_calls():
    import threading

    barrier = threading.Barrier(2)
    results = {}

    def worker(rows, length):
        q = torch.randn(1, 2, length, 4)
        with sdpa_capture.capture(rows=rows) as cache:
            barrier.wait()  # both blocks open at once
            for _ in range(5):
                _attend(q)
            barrier.wait()
        results[length] = cache

    threads = [threading.Thread(target=worker, args=args) for args in ((0, 3), (None, 5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e.shape for e in results[3]["_attend"]] == [(1, 2, 1, 3)] * 5
    assert [e.shape for e in results[5]["_attend"]] == [(1, 2, 5, 5)] * 5
    assert not sdpa_capture.is_active


def test_deactivate_from_another_thread_stops_recording_everywhere():
    import threading

    started, switched, done = threading.Event(), threading.Event(), threading.Event()
    counts = {}

    def worker():
        q = torch.randn(1, 1, 2, 2)
        sdpa_capture.activate()
        _attend(q)
        counts["before"] = len(get_local.cache["_attend"])
        started.set()
        switched.wait()
        _attend(q)  # switched off from the main thread: not recorded
        counts["after"] = len(get_local.cache["_attend"])
        counts["active"] = sdpa_capture.is_active
        sdpa_capture.deactivate()  # takes the inert mode off this thread's stack
        counts["stack"] = len(torch.overrides._get_current_function_mode_stack())
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    sdpa_capture.deactivate()
    switched.set()
    done.wait()
    thread.join()
    assert counts == {"before": 1, "after": 1, "active": False, "stack": 0}
    get_local.cache.pop("_attend")

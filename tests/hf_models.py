"""Small, randomly initialised Hugging Face models for attention-capture tests.

``CASES`` maps a short name to a :class:`Case`.  Every case builds a tiny
model (2 layers, hidden size 64, 4 heads) from a config with seeded random
weights -- nothing is downloaded -- together with deterministic inputs and
the ground truth needed to check a ``capture_attention(model)`` feature:

* ``build(attn_implementation)`` returns the model in ``eval()`` mode.  The
  weights are seeded, so ``build("eager")`` and ``build("sdpa")`` hold the
  same parameters (and give the same outputs to ~1e-5).
* ``inputs()`` returns the keyword arguments for ``model(**inputs)``.
* ``references`` lists, for every attention-returning attribute of the
  ``output_attentions=True`` output (dotted for nested outputs such as
  CLIP's ``text_model_output.attentions``), the module paths (names from
  ``model.named_modules()``) of the modules whose ``forward`` computes those
  attention maps, in layer order.  These are the innermost modules that call
  the attention function (``eager_attention_forward`` or the
  ``ALL_ATTENTION_FUNCTIONS`` interface), e.g. ``vit.layers.0.attention``
  for ViT in transformers 5 (no ``encoder`` / ``ViTSelfAttention`` level any
  more) and ``text_model.encoder.layers.0.self_attn`` for CLIP.
* ``valid_rows(inputs)`` (optional) tells which query rows are real tokens,
  see :func:`valid_rows_for`.  Only left-padded causal decoders (Llama)
  need it: there the padded query rows are *fully* masked, so eager gives a
  uniform row while SDPA outputs zeros (a naive softmax, NaN); they must not
  be compared.  BERT and DETR are padded too, but only their *keys* are
  masked: every query row is still a well-defined softmax and matches
  between implementations, so they have ``valid_rows=None``.

:func:`reference_attentions` runs the eager model with
``output_attentions=True`` and returns ``{module path: [tensor (B, H, Q, K)]}``.
Under ``attn_implementation="sdpa"`` transformers 5 returns *empty* tuples
for the attention attributes (the SDPA interface returns ``None`` weights and
the output recorder skips them), so references must come from eager.

:func:`llama_generate_case` returns the padded Llama model/inputs and the
keyword arguments for ``model.generate`` (greedy, 3 new tokens).

Quirks worth knowing (transformers 5.x, torch CPU):

* Weights use ``INIT_STD = 0.2`` (10x the default) so random maps are peaked
  rather than near-uniform; T5 keeps its default init (larger saturates it).
* Under SDPA the attention call gets: a bool mask (BERT, DETR encoder/cross,
  Llama, Mistral); ``is_causal=True`` and *no* mask (GPT-2, BART/Whisper
  decoder self-attention, CLIP text); a float mask holding the relative
  position bias with ``scale=1.0`` (T5, which never scales); ``scale=1.0``
  with an already scaled query (Whisper).  Llama's GQA keys arrive already
  repeated to 4 heads.  Llama's padded query rows have an all-False bool
  mask: torch's SDPA returns zeros for them, a naive softmax gives NaN,
  eager gives a uniform ``1/K`` row.
* DETR's backbone is transformers' own ``ResNetBackbone`` built from a tiny
  ``ResNetConfig`` (``use_timm_backbone=False``, ``use_pretrained_backbone=False``);
  it has no SDPA, so its sub-config is pinned to ``"eager"``.
* ``generate`` with a KV cache calls each attention module once per step
  (prompt ``Q=8``, then ``Q=1`` with ``K=9, 10``); with SDPA,
  ``output_attentions=True`` yields an empty tuple per step.
* On a busy 2-core machine torch's intra-op threads can make these tiny
  forwards ~100x slower; ``torch.set_num_threads(1)`` avoids it.

Tests should ``pytest.importorskip("transformers")`` before importing this
module.  It intentionally does not import ``visualizer``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
import transformers

# transformers 4.x names some attention modules differently (ViT's and DINOv2's
# innermost attention module is ``...attention.attention``, the old
# ``ViTSelfAttention`` level) and has no SDPA for some models (T5).
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

SEED = 0
HIDDEN = 64
HEADS = 4
LAYERS = 2
FFN = 128
VOCAB = 100
# Weight init std, ~10x the HF default: with the default (0.02) the random
# attention maps are almost uniform, so mixing up layers, heads or rows would
# go unnoticed.  With 0.2 the maps are peaked and distinct per layer/head.
INIT_STD = 0.2


@dataclasses.dataclass
class Case:
    """One test model.

    ``references`` is a list of ``(attribute, [module paths in layer order])``;
    ``attribute`` may be dotted (``"vision_model_output.attentions"``).
    ``valid_rows`` maps the inputs to a bool tensor ``(B, Q)`` of query rows
    that are not padding (applies to every reference) or to a dict
    ``attribute -> (B, Q)``; ``None`` means every row is comparable.
    ``notes`` documents padding / quirks.
    """

    name: str
    build: Callable[[str], torch.nn.Module]
    inputs: Callable[[], dict]
    references: list
    valid_rows: Callable[[dict], object] | None = None
    notes: str = ""

    def paths(self) -> list[str]:
        """All module paths of all references, in reference order."""
        return [p for _, paths in self.references for p in paths]


# ---------------------------------------------------------------------------
# helpers


def _builder(
    class_name: str, make_config: Callable[[], object], **fixed_subconfigs: str
) -> Callable[[str], torch.nn.Module]:
    """``build(attn_implementation)``: seed, then build from a fresh config.

    The model class is looked up by name at build time, so importing this
    module does not import every modeling file (transformers is lazy).
    ``fixed_subconfigs`` pins the implementation of sub-configs that do not
    support the requested one (DETR's ResNet backbone has no SDPA).
    """

    def build(attn_implementation: str = "eager") -> torch.nn.Module:
        model_cls = getattr(transformers, class_name)
        config = make_config()
        implementation = attn_implementation
        if fixed_subconfigs:
            implementation = {"": attn_implementation, **fixed_subconfigs}
        torch.manual_seed(SEED)
        try:
            model = model_cls._from_config(config, attn_implementation=implementation)
        except ValueError as error:
            if "does not support an attention implementation" not in str(error):
                raise
            pytest.skip(
                f"transformers {transformers.__version__}: {class_name} has no "
                f"attn_implementation={attn_implementation!r} (it has in transformers 5)"
            )
        if not TRANSFORMERS_5 and attn_implementation != "eager":
            # transformers 4.x initialises its per-implementation classes in a
            # different order: the seed alone does not give eager's weights.
            model.load_state_dict(build("eager").state_dict())
        return model.eval()

    return build


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(batch: int, length: int, seed: int, low: int = 3, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (batch, length), generator=_gen(seed))


def _layers(fmt: str, n: int = LAYERS) -> list[str]:
    return [fmt.format(i) for i in range(n)]


def get_attribute(outputs, attribute: str):
    """Resolve a possibly dotted attribute (``"text_model_output.attentions"``)."""
    value = outputs
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def valid_rows_for(case: Case, inputs: dict, attribute: str) -> torch.Tensor | None:
    """The ``(B, Q)`` bool mask of non-padding query rows for one reference, or None."""
    if case.valid_rows is None:
        return None
    rows = case.valid_rows(inputs)
    if isinstance(rows, dict):
        return rows.get(attribute)
    return rows


@torch.no_grad()
def reference_attentions(
    case: Case, model: torch.nn.Module, inputs: dict
) -> dict[str, list[torch.Tensor]]:
    """``{module path: [attention (B, H, Q, K)]}`` from ``output_attentions=True``.

    ``model`` must be built with ``attn_implementation="eager"``: under SDPA
    transformers returns no attention weights.
    """
    outputs = model(**inputs, output_attentions=True)
    result: dict[str, list[torch.Tensor]] = {}
    for attribute, paths in case.references:
        attentions = get_attribute(outputs, attribute)
        if attentions is None or len(attentions) != len(paths):
            got = None if attentions is None else len(attentions)
            raise AssertionError(
                f"{case.name}: {attribute} has {got} maps, expected {len(paths)} ({paths})"
            )
        for path, attention in zip(paths, attentions):
            result.setdefault(path, []).append(attention)
    return result


# ---------------------------------------------------------------------------
# BERT: bidirectional encoder, padded batch of 2 (right padding, keys masked)


def _bert_config():
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=32,
        pad_token_id=0,
        initializer_range=INIT_STD,
    )


def _bert_inputs():
    input_ids = _ids(2, 8, seed=1)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


BERT = Case(
    name="bert",
    build=_builder("BertModel", _bert_config),
    inputs=_bert_inputs,
    references=[("attentions", _layers("encoder.layer.{}.attention.self"))],
    notes=(
        "Right-padded row 1 (last 3 tokens): padded keys get ~0 weight, all query rows are "
        "valid."
    ),
)


# ---------------------------------------------------------------------------
# ViT: 32 px image, patch 8 -> 16 patches + CLS = 17 tokens


def _vit_config():
    return transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        num_labels=3,
        initializer_range=INIT_STD,
    )


def _image_inputs(size: int = 32, batch: int = 2, seed: int = 2):
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=_gen(seed))}


VIT = Case(
    name="vit",
    build=_builder("ViTForImageClassification", _vit_config),
    inputs=_image_inputs,
    references=[(
        "attentions",
        _layers("vit.layers.{}.attention" if TRANSFORMERS_5 else "vit.encoder.layer.{}.attention.attention"),
    )],
)


# ---------------------------------------------------------------------------
# DINOv2 with registers: 1 CLS + 4 registers + 16 patches = 21 tokens


def _dinov2_config():
    return transformers.Dinov2WithRegistersConfig(
        image_size=32,
        patch_size=8,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        mlp_ratio=2,
        num_register_tokens=4,
        initializer_range=INIT_STD,
    )


DINOV2 = Case(
    name="dinov2_registers",
    build=_builder("Dinov2WithRegistersModel", _dinov2_config),
    inputs=_image_inputs,
    references=[(
        "attentions",
        _layers("encoder.layer.{}.attention" if TRANSFORMERS_5 else "encoder.layer.{}.attention.attention"),
    )],
)


# ---------------------------------------------------------------------------
# DETR: transformers' own (tiny, random) ResNet backbone, no timm/torchvision


def _detr_config():
    backbone = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        out_features=["stage2"],
    )
    return transformers.DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        num_queries=10,
        num_labels=3,
        dropout=0.0,
        init_std=INIT_STD,
    )


def _detr_inputs():
    # 64 px -> stride-8 feature map 8x8 = 64 encoder tokens; image 1 padded on the right.
    pixel_values = torch.randn(2, 3, 64, 64, generator=_gen(3))
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[1, :, 48:] = 0
    pixel_values[1, :, :, 48:] = 0
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


DETR = Case(
    name="detr",
    build=_builder("DetrForObjectDetection", _detr_config, backbone_config="eager"),
    inputs=_detr_inputs,
    references=[
        ("encoder_attentions", _layers("model.encoder.layers.{}.self_attn")),
        ("decoder_attentions", _layers("model.decoder.layers.{}.self_attn")),
        ("cross_attentions", _layers("model.decoder.layers.{}.encoder_attn")),
    ],
    notes=(
        "pixel_mask pads image 1 (last 2 of 8 feature columns): encoder/cross keys masked, "
        "all query rows valid."
    ),
)


# ---------------------------------------------------------------------------
# GPT-2: causal decoder, no padding


def _gpt2_config():
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=INIT_STD,
    )


GPT2 = Case(
    name="gpt2",
    build=_builder("GPT2LMHeadModel", _gpt2_config),
    inputs=lambda: {"input_ids": _ids(2, 8, seed=4)},
    references=[("attentions", _layers("transformer.h.{}.attn"))],
)


# ---------------------------------------------------------------------------
# Llama with GQA (4 query heads, 2 key/value heads), left-padded batch of 2


def _llama_config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=INIT_STD,
    )


def _llama_inputs():
    input_ids = _ids(2, 8, seed=5)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0
    input_ids[1, :3] = 0  # pad_token_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


LLAMA = Case(
    name="llama_gqa",
    build=_builder("LlamaForCausalLM", _llama_config),
    inputs=_llama_inputs,
    references=[("attentions", _layers("model.layers.{}.self_attn"))],
    valid_rows=lambda inputs: inputs["attention_mask"].bool(),
    notes=(
        "Left-padded row 1 (first 3 tokens): those query rows are fully masked -> compare "
        "valid rows only. Maps have H=4 (key/value heads repeated)."
    ),
)


def llama_generate_case():
    """``(model_builder, inputs, generate_kwargs)`` for greedy generation on the padded Llama.

    Use as ``model = build(impl); model.generate(**inputs, **generate_kwargs)``;
    returns ``(B, 8 + 3)`` token ids and is identical for ``"eager"`` and ``"sdpa"``.
    """
    generate_kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    return LLAMA.build, LLAMA.inputs(), generate_kwargs


# ---------------------------------------------------------------------------
# Mistral: sliding window (4) smaller than the sequence (10)


def _mistral_config():
    return transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=INIT_STD,
    )


MISTRAL = Case(
    name="mistral_sliding",
    build=_builder("MistralForCausalLM", _mistral_config),
    inputs=lambda: {"input_ids": _ids(2, 10, seed=6)},
    references=[("attentions", _layers("model.layers.{}.self_attn"))],
    notes="sliding_window=4 < 10 tokens: keys older than the window get 0 weight.",
)


# ---------------------------------------------------------------------------
# T5: encoder self, decoder self, decoder cross (relative position bias)


def _t5_config():
    return transformers.T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=FFN,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _seq2seq_inputs(seed: int):
    return {"input_ids": _ids(2, 8, seed=seed), "decoder_input_ids": _ids(2, 5, seed=seed + 100)}


T5 = Case(
    name="t5",
    build=_builder("T5ForConditionalGeneration", _t5_config),
    inputs=lambda: _seq2seq_inputs(7),
    references=[
        ("encoder_attentions", _layers("encoder.block.{}.layer.0.SelfAttention")),
        ("decoder_attentions", _layers("decoder.block.{}.layer.0.SelfAttention")),
        ("cross_attentions", _layers("decoder.block.{}.layer.1.EncDecAttention")),
    ],
    notes=(
        "transformers records T5LayerSelfAttention/T5LayerCrossAttention outputs, but the "
        "attention is computed in their T5Attention children (SelfAttention / EncDecAttention)."
    ),
)


# ---------------------------------------------------------------------------
# BART: encoder self, decoder self, decoder cross


def _bart_config():
    return transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        init_std=INIT_STD,
    )


BART = Case(
    name="bart",
    build=_builder("BartForConditionalGeneration", _bart_config),
    inputs=lambda: _seq2seq_inputs(8),
    references=[
        ("encoder_attentions", _layers("model.encoder.layers.{}.self_attn")),
        ("decoder_attentions", _layers("model.decoder.layers.{}.self_attn")),
        ("cross_attentions", _layers("model.decoder.layers.{}.encoder_attn")),
    ],
)


# ---------------------------------------------------------------------------
# CLIP: both towers (causal text encoder, ViT vision encoder)


CLIP_INIT_FACTOR = (
    3.0  # CLIP's towers init from their own configs' factor (default 1 -> uniform vision maps)
)


def _clip_config():
    text = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_factor=CLIP_INIT_FACTOR,
    )
    vision = dict(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=32,
        patch_size=8,
        initializer_factor=CLIP_INIT_FACTOR,
    )
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def _clip_inputs():
    return {"input_ids": _ids(2, 7, seed=9), **_image_inputs(seed=10)}


CLIP = Case(
    name="clip",
    build=_builder("CLIPModel", _clip_config),
    inputs=_clip_inputs,
    references=[
        ("text_model_output.attentions", _layers("text_model.encoder.layers.{}.self_attn")),
        ("vision_model_output.attentions", _layers("vision_model.encoder.layers.{}.self_attn")),
    ],
)


# ---------------------------------------------------------------------------
# Whisper: 80 mel bins, max_source_positions=16 -> 32 input frames


def _whisper_config():
    return transformers.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=80,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        init_std=INIT_STD,
    )


def _whisper_inputs():
    return {
        "input_features": torch.randn(2, 80, 32, generator=_gen(11)),
        "decoder_input_ids": _ids(2, 5, seed=12),
    }


WHISPER = Case(
    name="whisper",
    build=_builder("WhisperForConditionalGeneration", _whisper_config),
    inputs=_whisper_inputs,
    references=[
        ("encoder_attentions", _layers("model.encoder.layers.{}.self_attn")),
        ("decoder_attentions", _layers("model.decoder.layers.{}.self_attn")),
        ("cross_attentions", _layers("model.decoder.layers.{}.encoder_attn")),
    ],
)


CASES: dict[str, Case] = {
    case.name: case
    for case in (BERT, VIT, DINOV2, DETR, GPT2, LLAMA, MISTRAL, T5, BART, CLIP, WHISPER)
}

"""Real captured maps for the explorer's tests: a ViT, an encoder-decoder, a DETR.

Each builder runs a small seeded model under `capture_attention` and returns
the maps with what `explore` needs beside them (image, geometry, tokens).
Nothing is downloaded: the models are this repository's examples and
transformers models built from tiny configs (tests/hf_models.py).
"""
import base64
import json
import re
from types import SimpleNamespace

import numpy as np
import torch

from visualizer import capture_attention
from visualizer.analysis import ImageGeometry

# What the page promises: a shown value is within 1/508 of its row's largest
# value of the captured one (plus float32 rounding of the row maximum).
BOUND_PER_ROW_MAX = 1 / 508 + 1e-6


def vit_case(rows=None, seed=0):
    """The examples' toy ViT (8x8 patches of 4 px + CLS + 2 registers), peaked random weights,
    on a drawn scene."""
    from examples.shapes_data import MEAN, STD, make_shapes
    from examples.toy_vit import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=(32, 32), patch_size=4, depth=3, num_heads=4, num_registers=2
    )
    with torch.no_grad():
        # Larger q/k weights than the init's: peaked maps whose argmax is clear.
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6)
    model.eval()
    # A drawn scene (normalized with MEAN, STD), so a screenshot shows an image.
    image = make_shapes(1, np.random.default_rng(seed + 1), image_size=32).images
    with capture_attention(model, rows=rows) as maps, torch.no_grad():
        model(image)
    geometry = ImageGeometry.from_model(model, mean=MEAN, std=STD)
    return SimpleNamespace(model=model, maps=maps, image=image, geometry=geometry)


def bart_case():
    """A tiny BART: encoder self-, causal decoder self- and cross-attention, by module path."""
    import transformers  # noqa: F401  (hf_models needs it)

    from tests import hf_models

    torch.set_num_threads(1)
    model = hf_models.BART.build("eager")
    inputs = hf_models.BART.inputs()
    with capture_attention(model) as maps, torch.no_grad():
        model(**inputs)
    tokens = [f"e{index}" for index in range(inputs["input_ids"].shape[1])]
    tokens[2] = "<script>window.__injected = 1</script>"  # must be shown, never run
    query_tokens = [f"d{index}" for index in range(inputs["decoder_input_ids"].shape[1])]
    return SimpleNamespace(model=model, maps=maps, tokens=tokens, query_tokens=query_tokens)


def detr_case(seed=0):
    """The DETR example's model, untrained: object queries' cross-attention over a 12x12 grid."""
    from examples import detr_cross_attention as detr
    from examples.shapes_data import MEAN, STD, make_scenes

    torch.manual_seed(seed)
    model = detr.TinyDETR().eval()
    scenes = make_scenes(1, np.random.default_rng(seed), image_size=detr.IMAGE_SIZE)
    image = torch.as_tensor(scenes.images[:1])
    with capture_attention(model) as maps, torch.no_grad():
        model(image)
    geometry = ImageGeometry(grid_size=detr.GRID, num_prefix_tokens=0, mean=MEAN, std=STD)
    return SimpleNamespace(
        model=model, maps=maps, image=image, geometry=geometry, boxes=scenes.boxes[0]
    )


def softmax_maps(shape, seed=0, sharpness=3.0):
    """Random attention maps (rows summing to 1) of ``shape``, float32."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=shape) * sharpness
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def payload(page_html):
    """The data a page embeds, decoded here independently of the page's script.

    Returns the JSON object with ``codes`` and ``scales`` replaced by numpy
    arrays, and per layer its values ``(H, R, K)`` as the encoding defines them.
    """
    match = re.search(
        r'<script[^>]*class="visualizer-explorer-data"[^>]*>(.*?)</script>',
        page_html,
        re.S,
    )
    data = json.loads(match.group(1))
    codes = np.frombuffer(base64.b64decode(data["codes"]), np.uint8)
    scales = np.frombuffer(base64.b64decode(data["scales"]), "<f4")
    for layer in data["layers"]:
        heads, rows, keys = len(layer["heads"]), len(layer["rows"]), layer["keys"]
        block = codes[layer["codeOffset"] : layer["codeOffset"] + heads * rows * keys]
        peaks = scales[layer["scaleOffset"] : layer["scaleOffset"] + heads * rows]
        block = block.reshape(heads, rows, keys).astype(np.float64)
        step = peaks.reshape(heads, rows, 1).astype(np.float64) / 254
        layer["values"] = np.where(block > 0, (block - 1) * step, 0.0)
    return data

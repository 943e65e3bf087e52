"""Capture attention from a model whose source you cannot edit: a Hugging Face ViT.

    python examples/huggingface_capture.py             # ~20 s on two CPU cores
    python examples/huggingface_capture.py --out figs --steps 200 --seed 1

`transformers.ViTForImageClassification`, built from a small config (no
download) and trained for a few seconds on the drawn shapes, so its maps mean
something. Its attention is captured two ways, neither touching transformers'
source:

1. `capture_attention(model)`: the model is the unit. It finds the attention
   modules itself and keys each map by its module path ('vit.layers.0.attention',
   ...), whatever implementation the model was loaded with. transformers 5 loads
   models with `attn_implementation="sdpa"` by default: the fused kernel never
   forms the weights, and they are recomputed beside each
   `F.scaled_dot_product_attention` call (`rows=0` for the CLS row only).
2. `get_local('attn_weights')` applied in place to
   `transformers.models.vit.modeling_vit.eager_attention_forward`, the function
   the EAGER implementation calls: it swaps the function's code, so the
   reference transformers already holds captures. A model loaded with "sdpa"
   never calls it; reading its empty cache entry then says so.

It prints the largest difference of each capture from transformers' own
`output_attentions` (computed by the eager model: the correctness check), and
how much of the trained model's last-layer CLS attention falls on the object
against the uniform share, before and after training.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see vit_walkthrough.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.models.vit import modeling_vit  # noqa: E402

from examples.shapes_data import MEAN, SHAPES, STD  # noqa: E402
from examples.train import (  # noqa: E402
    IMAGE_SIZE,
    PATCH_SIZE,
    evaluation_batch,
    object_share,
    train_vit,
)
from visualizer import capture_attention, get_local, plot  # noqa: E402

CONFIG = dict(
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    num_labels=len(SHAPES),
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
GRID = (IMAGE_SIZE // PATCH_SIZE, IMAGE_SIZE // PATCH_SIZE)
EAGER_KEY = "eager_attention_forward"
DPI = 90


class Logits(nn.Module):
    """A Hugging Face classifier as a module returning logits, as `train_vit` expects."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(pixel_values=images).logits


def build(implementation, seed):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**CONFIG, attn_implementation=implementation)).eval()


def cls_share(model, batch):
    """Object share of the last layer's CLS row, captured from the fused kernel."""
    with capture_attention(model, rows=0) as maps, torch.no_grad():
        logits = model(pixel_values=batch.images).logits
    last_layer = list(maps)[-1]
    return object_share(maps[last_layer][0], logits, batch, GRID)  # (B, H, 1, N) rows


def max_difference(captured, reference):
    """Largest absolute difference between captured maps and transformers' attentions."""
    return max(
        float(np.abs(np.asarray(got) - want.numpy()).max())
        for got, want in zip(captured, reference)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/huggingface_capture"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", type=int, default=0, help="index of the held-out image to draw")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    batch = evaluation_batch()
    model = build("sdpa", args.seed)
    before = cls_share(model, batch)
    print(f"random weights: {before}")
    print(f"training the Hugging Face ViT (sdpa) for {args.steps} steps")
    train_vit(Logits(model), args.steps, seed=args.seed)
    after = cls_share(model, batch)
    print(f"trained: {after}")

    # The reference: transformers' own weights, from the eager implementation.
    eager = build("eager", args.seed)
    eager.load_state_dict(model.state_dict())
    images = batch.images[:16]
    with torch.no_grad():
        reference = eager(pixel_values=images, output_attentions=True).attentions

    # 1. The whole model, as loaded ("sdpa"): one key per attention module.
    with capture_attention(model) as maps, torch.no_grad():
        model(pixel_values=images)
    fused_maps = [entries[0] for entries in maps.values()]
    fused_difference = max_difference(fused_maps, reference)

    # 2. transformers' eager attention function, instrumented in place: only a
    #    model loaded with attn_implementation="eager" calls it.
    get_local("attn_weights")(modeling_vit.eager_attention_forward)
    with get_local.capture() as cache, torch.no_grad():
        eager(pixel_values=images)
    eager_maps = cache[EAGER_KEY]  # one (B, H, N, N) array per layer
    eager_difference = max_difference(eager_maps, reference)
    print(
        f"{len(maps)} attention modules {list(maps)} of {fused_maps[0].shape} maps; largest "
        f"difference from output_attentions: capture_attention on the sdpa model "
        f"{fused_difference:.1e}, get_local on eager_attention_forward {eager_difference:.1e}"
    )

    index, last = args.image, len(fused_maps) - 1
    figures = {
        "hf_cls_attention_sdpa": plot.cls_attention(
            fused_maps[last],
            images,
            grid_size=GRID,
            batch_index=index,
            layer=last,
            threshold=0.6,
            ncols=5,
            mean=MEAN,
            std=STD,
        ),
        "hf_heads_eager": plot.heads(eager_maps[last], batch_index=index, layer=last, ncols=5),
    }
    paths = []
    for name, figure in figures.items():
        paths.append(args.out / f"{name}.png")
        figure.savefig(paths[-1], dpi=DPI)
    print(f"figures written to {args.out}/")
    print(
        f"last-layer CLS attention on the object: {before.on_object:.1%} before training, "
        f"{after.on_object:.1%} after (uniform share {after.uniform:.1%})"
    )
    return {
        "before": before,
        "after": after,
        "eager_difference": eager_difference,
        "fused_difference": fused_difference,
        "figures": paths,
    }


if __name__ == "__main__":
    main()

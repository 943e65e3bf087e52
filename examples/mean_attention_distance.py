"""Mean attention distance of the example ViT, per layer and head (ViT paper, Figure 7).

    python examples/mean_attention_distance.py --checkpoint out/vit_walkthrough/vit.pt   # ~3 s
    python examples/mean_attention_distance.py           # trains the ViT first, ~20 s

How far, in pixels, each head looks from its query patch, averaged over query
patches and held-out images, with random weights and after training, beside
two references computed by the same function on made-up maps: attention
spread evenly over all patches, and attention spread evenly over the object's
patches only.

What it shows, and prints: with random weights every head sits at the
uniform-attention distance (random attention is nearly uniform). Trained
heads move below it, toward the object-only distance: they look at the object
wherever it is, from every query patch. None becomes local: the ViT paper's
local heads in early layers come from ImageNet-scale training, not from a few
hundred steps on one-object images, and this picture does not pretend otherwise.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see vit_walkthrough.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from examples.shapes_data import patch_coverage  # noqa: E402
from examples.train import (  # noqa: E402
    ATTENTION_KEY,
    OBJECT_COVERAGE,
    PATCH_SIZE,
    add_vit_arguments,
    build_vit,
    evaluation_batch,
    load_or_train,
)
from visualizer import analysis, get_local, plot  # noqa: E402

DPI = 90


def distances(model, batch):
    """``(L, H)`` mean attention distance in pixels over the batch."""
    with get_local.capture() as cache, torch.no_grad():
        model(batch.images)
    return analysis.mean_attention_distance(
        cache[ATTENTION_KEY], model.grid_size, model.num_prefix_tokens, patch_size=PATCH_SIZE
    )


def references(batch, grid_size):
    """Distances of made-up maps ``(B, H=1, N, N)`` (CLS column left empty), by the same function.

    Returns a dict: attention uniform over all patches; uniform over the
    object's patches; uniform over each query's 3x3 neighbourhood (a local head).
    """
    on_object = patch_coverage(batch.masks, PATCH_SIZE) >= OBJECT_COVERAGE
    on_object = on_object.reshape(len(on_object), -1)
    rows, cols = np.divmod(np.arange(grid_size[0] * grid_size[1]), grid_size[1])
    near = (np.abs(rows[:, None] - rows) <= 1) & (np.abs(cols[:, None] - cols) <= 1)
    weights = {
        "uniform over the image": np.ones((1, 1, on_object.shape[1])),
        "uniform over the object": on_object[:, None, None, :],
        "uniform over the 3x3 neighbours": near[None, None],
    }
    result = {}
    for name, weight in weights.items():
        weight = np.broadcast_to(weight, (len(weight), 1, *near.shape)).astype(np.float64)
        maps = np.zeros((len(weight), 1, near.shape[0] + 1, near.shape[0] + 1))
        maps[:, :, 1:, 1:] = weight / weight.sum(axis=-1, keepdims=True)
        result[name] = float(analysis.mean_attention_distance(maps, grid_size, 1, PATCH_SIZE)[0])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/mean_attention_distance"))
    add_vit_arguments(parser)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    batch = evaluation_batch()
    random_model = build_vit(args.seed).eval()
    trained = load_or_train(args.checkpoint, args.steps, args.seed)
    results = {"random": distances(random_model, batch), "trained": distances(trained, batch)}
    reference = references(batch, trained.grid_size)
    uniform = reference["uniform over the image"]

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (name, values) in zip(axes, results.items()):
        plot.mean_attention_distance(values, ax=ax, title=f"{name} weights")
        for (label, distance), style in zip(reference.items(), ["--", ":", "-."]):
            ax.axhline(distance, color="gray", linestyle=style, linewidth=1)
            ax.text(len(values) - 1, distance, label, ha="right", va="bottom", fontsize="small")
        ax.set_ylim(top=1.2 * uniform)  # room above the references' labels
    path = args.out / "mean_attention_distance.png"
    fig.savefig(path, dpi=DPI)

    print("references: " + ", ".join(f"attention {k} {v:.1f} px" for k, v in reference.items()))
    for name, values in results.items():
        layers = ", ".join(
            f"layer {layer} {row.min():.1f}-{row.max():.1f}" for layer, row in enumerate(values)
        )
        print(
            f"{name}: mean attention distance per layer (heads' range, px): {layers}; closest head "
            f"{uniform - values.min():.1f} px below uniform"
        )
    print(f"figure written to {path}")
    return {**results, "references": reference, "figures": [path]}


if __name__ == "__main__":
    main()

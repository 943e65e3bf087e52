"""Attention rollout of the example ViT, overlaid on the images it classified.

    python examples/attention_rollout.py --checkpoint out/vit_walkthrough/vit.pt   # ~4 s
    python examples/attention_rollout.py           # trains the ViT first, ~20 s

Rollout (Abnar & Zuidema, 2020) multiplies the layers' head-averaged maps,
with the identity added for the residual path, to say how much the CLS output
draws on each input patch. Gradient rollout (Chefer et al., 2021) keeps only
the attention that raises the predicted class's score; its maps are captured
on the model's device with their autograd graph
(`get_local.capture(keep_on_device=True, detach=False)`), so the gradients
come from the very tensors the forward pass used.

It prints, for random and trained weights, the share of each rollout's CLS row
that falls on the object's patches against the share uniform attribution
would give, and draws both rollouts over a few held-out images.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see vit_walkthrough.py

from matplotlib.figure import Figure  # noqa: E402

from examples.shapes_data import MEAN, SHAPES, STD, patch_coverage  # noqa: E402
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


def rollouts(model, batch):
    """``{"attention rollout": (B, N, N), "gradient rollout": (B, N, N)}`` and the predictions."""
    model.eval()
    with get_local.capture(keep_on_device=True, detach=False) as cache:
        logits = model(batch.images)
    maps = cache[ATTENTION_KEY]  # tensors in the autograd graph, one per block
    predicted = logits.argmax(-1)
    # Items do not interact, so the summed score gives each item its own gradient.
    score = logits.gather(1, predicted[:, None]).sum()
    return {
        "attention rollout": analysis.attention_rollout(maps),
        "gradient rollout": analysis.gradient_rollout(maps, score=score),
    }, predicted


def share_on_object(rollout, batch, model):
    """Mean share of the rollout's CLS row over patches that falls on the object's patches."""
    cls = analysis.rollout_cls_attention(rollout, model.grid_size, model.num_prefix_tokens)
    cls = cls / cls.sum(axis=(-2, -1), keepdims=True)
    on_object = patch_coverage(batch.masks, PATCH_SIZE) >= OBJECT_COVERAGE
    return float((cls * on_object).sum(axis=(-2, -1)).mean()), float(on_object.mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/attention_rollout"))
    add_vit_arguments(parser)
    parser.add_argument("--images", type=int, default=5, help="how many held-out images to draw")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    batch = evaluation_batch()
    models = {
        "random": build_vit(args.seed),
        "trained": load_or_train(args.checkpoint, args.steps, args.seed),
    }
    shares, drawn = {}, {}
    for name, model in models.items():
        drawn[name] = rollouts(model, batch)
        for kind, rollout in drawn[name][0].items():
            shares[name, kind], uniform = share_on_object(rollout, batch, model)
            print(
                f"{name} weights, {kind}: {shares[name, kind]:.1%} of the CLS row on the object "
                f"vs uniform share {uniform:.1%} = {shares[name, kind] / uniform:.1f}x"
            )

    # The trained model's rollouts: one row per kind, one column per image.
    results, predicted = drawn["trained"]
    fig = Figure(figsize=(2.6 * args.images, 5.6), layout="constrained")
    axes = fig.subplots(len(results), args.images, squeeze=False)
    for row, (kind, rollout) in enumerate(results.items()):
        for index, ax in enumerate(axes[row]):
            verdict = "" if predicted[index] == batch.labels[index] else " (wrong)"
            plot.rollout(
                rollout,
                batch.images,
                grid_size=models["trained"].grid_size,
                batch_index=index,
                mean=MEAN,
                std=STD,
                title=f"{kind}\npredicted {SHAPES[predicted[index]]}{verdict}",
                ax=ax,
            )
    path = args.out / "rollout.png"
    fig.savefig(path, dpi=DPI)
    print(f"figure written to {path}")
    return {"shares": shares, "uniform": uniform, "figures": [path]}


if __name__ == "__main__":
    main()

"""Mean attention distance: vectorized `visualizer.analysis` against the double-loop reference.

The reference is the code people copy from the ViT-paper probing notebook
(all-things-vits, "mean_attention_distance.ipynb"): per layer it rebuilds the
patch distance matrix with a Python double loop over (query, key) patches and
then takes the weighted sum. Both run here, in the same process, on the same
random maps: 12 layers x 12 heads, batch 1, CLS + a 14x14 grid (ViT-B/16 at
224 px) and CLS + a 37x37 grid (DINOv2 ViT/14 at 518 px).

At 37x37 the reference needs minutes for 12 layers, so it is timed on
``--reference-layers`` layers (default 1) and scaled to 12; the output says so.

Run: python benchmarks/bench_mean_attention_distance.py
"""

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from visualizer.analysis import mean_attention_distance  # noqa: E402

LAYERS = 12
HEADS = 12
PATCH_SIZE = 16


def reference_distance_matrix(patch_size, num_patches, length):
    """The widely copied helper: O(N^2) interpreted steps."""
    distance_matrix = np.zeros((num_patches, num_patches))
    for i in range(num_patches):
        for j in range(num_patches):
            if i == j:
                continue
            xi, yi = (int(i / length)), (i % length)
            xj, yj = (int(j / length)), (j % length)
            distance_matrix[i, j] = patch_size * np.linalg.norm([xi - xj, yi - yj])
    return distance_matrix


def reference_mean_attention_distance(patch_size, attention_weights, num_cls_tokens):
    """The reference per-layer function: slice off CLS, weight, sum over keys, mean over queries."""
    attention_weights = attention_weights[..., num_cls_tokens:, num_cls_tokens:]
    num_patches = attention_weights.shape[-1]
    length = int(np.sqrt(num_patches))
    distance_matrix = reference_distance_matrix(patch_size, num_patches, length)
    mean_distances = np.sum(attention_weights * distance_matrix[None, None], axis=-1)
    return np.mean(mean_distances, axis=-1)  # (batch, heads)


def random_layers(side, seed):
    """12 layers of softmax attention (1, 12, 1 + side^2, 1 + side^2), float32."""
    rng = np.random.default_rng(seed)
    tokens = 1 + side * side
    layers = []
    for _ in range(LAYERS):
        logits = rng.normal(scale=2.0, size=(1, HEADS, tokens, tokens)).astype(np.float32)
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        layers.append(weights / weights.sum(axis=-1, keepdims=True))
    return layers


def first_and_best_time(function, repeats):
    """Seconds of the first call (cold distance-matrix cache) and the best of ``repeats``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return times[0], min(times), result


def run(side, reference_layers, seed):
    layers = random_layers(side, seed)
    # The reference does not renormalize over patch keys; giving it maps whose
    # patch rows are renormalized (CLS dropped) makes both compute the same thing.
    patch_only = [
        layer[..., 1:, 1:] / layer[..., 1:, 1:].sum(axis=-1, keepdims=True) for layer in layers
    ]

    first_seconds, best_seconds, vectorized = first_and_best_time(
        lambda: mean_attention_distance(layers, patch_size=PATCH_SIZE), 5
    )

    measured = patch_only[:reference_layers]
    start = time.perf_counter()
    reference = np.stack(
        [reference_mean_attention_distance(PATCH_SIZE, layer, 0)[0] for layer in measured]
    )
    reference_seconds = (time.perf_counter() - start) * LAYERS / len(measured)

    max_difference = float(np.abs(vectorized[: len(measured)] - reference).max())
    if max_difference > 1e-3:
        raise SystemExit(f"results differ at {side}x{side}: max |difference| = {max_difference} px")
    return {
        "grid": f"{side}x{side}",
        "tokens": 1 + side * side,
        "reference": reference_seconds,
        "reference_note": "measured"
        if len(measured) == LAYERS
        else f"{len(measured)} of {LAYERS} layers, x{LAYERS / len(measured):g}",
        "first": first_seconds,
        "best": best_seconds,
        "max_difference": max_difference,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference-layers",
        type=int,
        default=1,
        help="layers the 37x37 reference is timed on (1-12)",
    )
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    reference_layers = min(max(arguments.reference_layers, 1), LAYERS)

    rows = [run(14, LAYERS, arguments.seed), run(37, reference_layers, arguments.seed)]
    print(
        f"Mean attention distance, {LAYERS} layers x {HEADS} heads, batch 1, float32, patch "
        f"{PATCH_SIZE} px"
    )
    print(f"numpy {np.__version__}, Python {sys.version.split()[0]}\n")
    print(
        "| grid | tokens | double-loop reference (s) | reference timing "
        "| vectorized, first call (s) | vectorized, best of 5 (s) | speed-up (first call) "
        "| max abs diff (px) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['grid']} | {row['tokens']} | {row['reference']:.2f} "
            f"| {row['reference_note']} | {row['first']:.4f} | {row['best']:.4f} "
            f"| {row['reference'] / row['first']:.0f}x | {row['max_difference']:.1e} |"
        )
    print(
        "\nvectorized: mean_attention_distance over all 12 layers; the first call of a grid "
        "size also builds the distance matrix, later calls reuse it."
    )


if __name__ == "__main__":
    main()

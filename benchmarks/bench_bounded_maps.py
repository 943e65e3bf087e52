"""capture_attention(max_entries=N): the cost per forward does not grow with N (O(1) bound).

    python benchmarks/bench_bounded_maps.py            # ~1 minute on 2 cores

A tiny model (two attention blocks, 16 tokens) makes the bookkeeping, not the
copies, most of the cost. Each round runs `--forwards` forwards for each bound,
the bounds in a seeded random order, with the lists already full (every append
drops one entry); it prints the median time per forward and its ratio to
max_entries=10, measured in the same run.
"""
import argparse
import pathlib
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples.toy_vit import VisionTransformer  # noqa: E402
from visualizer import capture_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bounds", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--forwards", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=(16, 16), patch_size=4, dim=32, depth=2, num_heads=4).eval()
    images = torch.randn(1, 3, 16, 16)
    recorders = {bound: capture_attention(model, max_entries=bound) for bound in args.bounds}
    times = {bound: [] for bound in args.bounds}
    order = random.Random(0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RuntimeWarning)  # "older entries are dropped"
        for bound, recorder in recorders.items():  # fill every list to its bound
            with recorder:
                for _ in range(bound + 1):
                    model(images)
        for _ in range(args.rounds):
            for bound in order.sample(args.bounds, len(args.bounds)):
                with recorders[bound]:
                    start = time.perf_counter()
                    for _ in range(args.forwards):
                        model(images)
                    times[bound].append((time.perf_counter() - start) / args.forwards)
    base = statistics.median(times[args.bounds[0]])
    print(f"{'max_entries':>12} {'per forward':>12} {'ratio':>6}")
    for bound in args.bounds:
        median = statistics.median(times[bound])
        print(f"{bound:>12} {median * 1e6:>10.1f}us {median / base:>6.2f}")


if __name__ == "__main__":
    main()

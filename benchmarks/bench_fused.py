"""Fused-attention capture vs switching the model to eager attention.

A ViT-S/16 (examples/toy_vit.py with 12 layers, dim 384, 6 heads, MLP ratio
2, random weights, batch 1; `Attention.forward` carries get_local('attn') and
its `fused` flag picks F.scaled_dot_product_attention) at 224 px
(14x14 patches + CLS = 197 tokens) and 518 px (DINOv2's input size; 32x32
patches of 16 px + CLS = 1025 tokens):

- time: forward with `sdpa_capture` (CLS row or full maps) and eager-attention
  forward with `get_local` capture, as ratios to the plain fused forward,
  all measured in this run, interleaved round-robin, median of the repeats;
- memory: the bytes the cache holds after one forward, and the extra peak
  memory of that forward over a plain fused forward of the same model.

    python benchmarks/bench_fused.py                  # CPU, about 2 minutes on 2 cores
    python benchmarks/bench_fused.py --device cuda    # peaks from torch.cuda.max_memory_allocated
    python benchmarks/bench_fused.py --threads 1      # steadier on a shared machine

Peak memory on the CPU (Linux): torch's allocations are invisible to
tracemalloc, so each (size, configuration) runs in a fresh subprocess that
does a warm-up forward, then measures the peak resident set (VmHWM, reset
through /proc/self/clear_refs) above the resident set at the start of one
plain fused forward and of one forward of the configuration; the extra peak
is the difference. Page-granular and subject to allocator caching, so below
about 1 MB it reads as 0, but it sees every allocation, including what the
cache keeps. On CUDA the same two forwards are measured with
torch.cuda.max_memory_allocated above torch.cuda.memory_allocated.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.toy_vit import VisionTransformer
from visualizer import get_local
from visualizer.fused import sdpa_capture

PATCH, DIM, DEPTH, HEADS = 16, 384, 12, 6


def set_fused(model, fused):
    for block in model.blocks:
        block.attn.fused = fused


BASELINE = "fused"

# name -> (fused attention?, context manager yielding the cache or None)
CONFIGS = {
    BASELINE: (True, contextlib.nullcontext),
    "fused + sdpa_capture, CLS row": (True, lambda: sdpa_capture.capture(rows=0)),
    "fused + sdpa_capture, full maps": (True, sdpa_capture.capture),
    "eager": (False, contextlib.nullcontext),
    "eager + get_local, full maps": (False, get_local.capture),
}


def forward(model, images, config):
    fused, capture = CONFIGS[config]
    set_fused(model, fused)
    with torch.no_grad(), capture() as cache:
        model(images)
    return cache or {}


def cache_bytes(cache):
    return sum(entry.nbytes for entries in cache.values() for entry in entries)


def build(image_size, device):
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=(image_size, image_size), patch_size=PATCH, dim=DIM, depth=DEPTH, num_heads=HEADS
    )
    model = model.to(device).eval()
    return model, torch.randn(1, 3, image_size, image_size, device=device)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_configs(image_size, device, repeats, configs):
    """Median milliseconds per config, the configs interleaved round-robin."""
    model, images = build(image_size, device)
    times = {config: [] for config in configs}
    for config in configs:
        forward(model, images, config)  # warm-up
    for _ in range(repeats):
        for config in configs:
            synchronize(device)
            start = time.perf_counter()
            forward(model, images, config)
            synchronize(device)
            times[config].append((time.perf_counter() - start) * 1000)
    return {config: statistics.median(values) for config, values in times.items()}


def measure_memory(image_size, device, config):
    """In this (fresh) process: cache bytes and extra peak bytes of one forward."""
    model, images = build(image_size, device)
    forward(model, images, BASELINE)  # warm-up: lazy inits, allocator pools
    baseline = peak_during(lambda: forward(model, images, BASELINE), device)
    cache = {}
    peak = peak_during(lambda: cache.update(forward(model, images, config)), device)
    return {"cache": cache_bytes(cache), "extra_peak": max(peak - baseline, 0)}


def peak_during(run, device):
    """Peak memory of `run()` above what was in use when it started, in bytes."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    # Linux: writing 5 to clear_refs resets the resident set's high-water
    # mark (VmHWM) to the current resident set (VmRSS).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    start = resident_kilobytes()["VmRSS"]
    run()
    return (resident_kilobytes()["VmHWM"] - start) * 1024


def resident_kilobytes():
    with open("/proc/self/status") as status:
        return {
            line.split(":")[0]: int(line.split()[1])
            for line in status
            if line.startswith(("VmRSS:", "VmHWM:"))
        }


def memory_in_subprocess(image_size, device, config):
    command = [sys.executable, __file__, "--child", json.dumps([image_size, device, config])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def megabytes(count):
    return f"{count / 2**20:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_memory(*json.loads(args.child))))
        return

    print(
        f"ViT-S/16 (examples/toy_vit.py: {DEPTH} layers, dim {DIM}, {HEADS} heads), batch 1, "
        f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} forwards\n"
    )
    tokens = {size: (size // PATCH) ** 2 + 1 for size in args.sizes}
    columns = "".join(f" {size} px, {tokens[size]} tokens |" for size in args.sizes)
    rule = "|---|" + "---:|" * len(args.sizes)

    print("Forward time, ms (ratio to the plain fused forward)\n")
    print("| forward |" + columns)
    print(rule)
    timings = {
        size: time_configs(size, args.device, args.repeats, list(CONFIGS)) for size in args.sizes
    }
    for config in CONFIGS:
        cells = ""
        for size in args.sizes:
            milliseconds = timings[size][config]
            cells += f" {milliseconds:.1f} ({milliseconds / timings[size][BASELINE]:.2f}) |"
        print(f"| {config} |{cells}")

    print("\nMemory, MB: held by the cache / extra peak over a plain fused forward\n")
    print("| forward |" + columns)
    print(rule)
    for config in CONFIGS:
        if config == BASELINE:
            continue
        cells = ""
        for size in args.sizes:
            memory = memory_in_subprocess(size, args.device, config)
            cells += f" {megabytes(memory['cache'])} / {megabytes(memory['extra_peak'])} |"
        print(f"| {config} |{cells}")
    if len(args.sizes) > 1:
        growth = tokens[args.sizes[-1]] / tokens[args.sizes[0]]
        print(
            f"\nTokens grow x{growth:.1f} from {args.sizes[0]} to {args.sizes[-1]} px, "
            f"tokens² x{growth**2:.1f}."
        )


if __name__ == "__main__":
    main()

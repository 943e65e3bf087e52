"""Fused-attention capture vs switching the model to eager attention.

A ViT-S/14 (examples/toy_vit.py with 12 layers, dim 384, 6 heads, MLP ratio
2, random weights, batch 1; `Attention.forward` carries get_local('attn') and
its `fused` flag picks F.scaled_dot_product_attention) in DINOv2's geometry,
patch 14: at 224 px (16x16 patches + CLS = 257 tokens) and 518 px (DINOv2's
input size; 37x37 patches + CLS = 1370 tokens). `--patch` and `--sizes`
change the geometry.

Configurations (one table, CONFIGS): the plain fused forward (the baseline),
`sdpa_capture` and `capture_attention(model)` on the fused path (CLS query
row, rows=0, or full maps), and the model switched to eager attention, plain,
with `get_local` or with `capture_attention` (full maps).

- time: milliseconds of one forward (wall time; with --cpu-time this
  process's CPU time), all configurations measured in this run, interleaved
  (one forward of each per round, in a new random order, so drift in the machine's load
  touches all alike), after one warm-up forward each: median and
  interquartile range over the rounds, and the ratio to the plain fused
  forward of the same round, as median and interquartile range of those
  per-round ratios;
- memory: the bytes the cache holds after one forward, and the extra peak
  memory of that forward over a plain fused forward of the same model.

    python benchmarks/bench_fused.py                  # CPU: about 5 minutes on 2 idle cores
    python benchmarks/bench_fused.py --threads 1      # steadier on a shared machine
    python benchmarks/bench_fused.py --threads 1 --cpu-time  # time taken by others not counted
    python benchmarks/bench_fused.py --device cuda    # peaks from torch.cuda.max_memory_allocated
    python benchmarks/bench_fused.py --sizes 224 --repeats 5  # a quick look

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
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.toy_vit import VisionTransformer
from visualizer import capture_attention, get_local
from visualizer.fused import sdpa_capture

DIM, DEPTH, HEADS = 384, 12, 6


def set_fused(model, fused):
    for block in model.blocks:
        block.attn.fused = fused


def no_capture(model):
    return contextlib.nullcontext()


BASELINE = "fused"

# name -> (fused attention?, model -> context manager yielding the maps, or None)
CONFIGS = {
    BASELINE: (True, no_capture),
    "fused + sdpa_capture, CLS row": (True, lambda model: sdpa_capture.capture(rows=0)),
    "fused + sdpa_capture, full maps": (True, lambda model: sdpa_capture.capture()),
    "fused + capture_attention, CLS row": (True, lambda model: capture_attention(model, rows=0)),
    "fused + capture_attention, full maps": (True, capture_attention),
    "eager": (False, no_capture),
    "eager + get_local, full maps": (False, lambda model: get_local.capture()),
    "eager + capture_attention, full maps": (False, capture_attention),
}


def forward(model, images, config):
    fused, capture = CONFIGS[config]
    set_fused(model, fused)
    with torch.no_grad(), capture(model) as cache:
        model(images)
    return cache or {}


def cache_bytes(cache):
    return sum(entry.nbytes for entries in cache.values() for entry in entries)


def tokens(image_size, patch):
    return (image_size // patch) ** 2 + 1


def build(image_size, patch, device):
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=(image_size, image_size), patch_size=patch, dim=DIM, depth=DEPTH, num_heads=HEADS
    )
    model = model.to(device).eval()
    return model, torch.randn(1, 3, image_size, image_size, device=device)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_configs(image_size, patch, device, repeats, clock):
    """Milliseconds of one forward per config and round, the configs interleaved.

    Each round runs them in a new (seeded) random order: a forward's page faults
    cost more or less depending on what the forward before it freed, so no
    config may always follow the same one (see benchmarks/run_all.py).
    """
    model, images = build(image_size, patch, device)
    times = {config: [] for config in CONFIGS}
    for config in CONFIGS:
        forward(model, images, config)  # warm-up
    order = random.Random(0)
    for _ in range(repeats):
        for config in order.sample(list(CONFIGS), len(CONFIGS)):
            synchronize(device)
            start = clock()
            forward(model, images, config)
            synchronize(device)
            times[config].append((clock() - start) * 1000)
    return times


def summary(values, digits):
    """Median and interquartile range, e.g. '41.2 (40.1-43.0)'."""
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def measure_memory(image_size, patch, device, config):
    """In this (fresh) process: cache bytes and extra peak bytes of one forward."""
    model, images = build(image_size, patch, device)
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


def memory_in_subprocess(image_size, patch, device, config, threads):
    child = json.dumps([image_size, patch, device, config])
    command = [sys.executable, __file__, "--child", child]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def megabytes(count):
    return f"{count / 2**20:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    parser.add_argument("--patch", type=int, default=14, help="patch size in px (default: 14)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds (default: 20)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU time (user + system), not wall time: steadier on a "
        "busy machine with --threads 1 (more threads add their spin-waits); CPU only",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # get_local's notice that Attention.forward's fused calls are left to
    # sdpa_capture: expected here, where the model takes both paths.
    warnings.filterwarnings("ignore", "get_local: 'attn' not bound", RuntimeWarning)
    if args.child:
        print(json.dumps(measure_memory(*json.loads(args.child))))
        return
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (quartiles)")
    if args.cpu_time and args.device == "cuda":
        parser.error("--cpu-time does not see the GPU's work; time CUDA by wall time")
    clock, clock_name = (time.process_time, "CPU") if args.cpu_time else (time.perf_counter, "wall")

    started = time.perf_counter()
    print(
        f"ViT-S/{args.patch} (examples/toy_vit.py: {DEPTH} layers, dim {DIM}, {HEADS} heads), "
        f"batch 1, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved rounds\n"
    )
    counts = {size: tokens(size, args.patch) for size in args.sizes}
    columns = {size: f"{size} px, {counts[size]} tokens" for size in args.sizes}

    print(
        f"Forward time, {clock_name} ms: median (interquartile range) over the rounds; ratio to "
        "the plain fused forward of the same round: median (interquartile range)\n"
    )
    print("| forward |" + "".join(f" {columns[size]}: ms | ratio |" for size in args.sizes))
    print("|---|" + "---:|---:|" * len(args.sizes))
    timings = {
        size: time_configs(size, args.patch, args.device, args.repeats, clock)
        for size in args.sizes
    }
    for config in CONFIGS:
        cells = ""
        for size in args.sizes:
            times = timings[size]
            ratios = [value / base for value, base in zip(times[config], times[BASELINE])]
            cells += f" {summary(times[config], 1)} | {summary(ratios, 2)} |"
        print(f"| {config} |{cells}")

    growth = len(args.sizes) > 1
    print("\nMemory, MB: held by the cache / extra peak over a plain fused forward\n")
    print(
        "| forward |"
        + "".join(f" {columns[size]} |" for size in args.sizes)
        + (" cache growth |" if growth else "")
    )
    print("|---|" + "---:|" * (len(args.sizes) + growth))
    for config in CONFIGS:
        if config == BASELINE:
            continue
        memory = {
            size: memory_in_subprocess(size, args.patch, args.device, config, args.threads)
            for size in args.sizes
        }
        cells = "".join(
            f" {megabytes(memory[size]['cache'])} / {megabytes(memory[size]['extra_peak'])} |"
            for size in args.sizes
        )
        if growth:
            first, last = (memory[size]["cache"] for size in (args.sizes[0], args.sizes[-1]))
            cells += f" x{last / first:.1f} |" if first else " - |"
        print(f"| {config} |{cells}")
    if growth:
        factor = counts[args.sizes[-1]] / counts[args.sizes[0]]
        print(
            f"\nCache growth from {args.sizes[0]} to {args.sizes[-1]} px; tokens grow "
            f"x{factor:.1f}, tokens² x{factor**2:.1f}."
        )
    print(f"\nWall time of this run: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

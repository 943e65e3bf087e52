"""Cost of capture, as ratios against baselines measured in the same run.

Quick, sequential timings (one variant after another): the published figures
(benchmarks/README.md) come from benchmarks/run_all.py, which interleaves the
variants over many rounds.

    python benchmarks/bench_capture.py            # one-line function (+ ViT if torch is installed)
    python benchmarks/bench_capture.py --device cuda

1. A one-line function: undecorated, decorated with capture off, capture on,
   and the original Visualizer's technique (return a tuple from a rewritten
   code object, unpack it in a wrapper), re-implemented here as a baseline.
   Runs on any Python 3.9+ (torch not needed).
2. One captured tensor (a decorated function that returns it) against the
   bare copy expression the policy performs: get_local's own cost per capture.
3. A small ViT forward (12 blocks, 257 tokens): capture off, the bare cost of
   copying the captured bytes (forward edited to append a copy of `attn` to a
   global list, today's workaround), and get_local, interleaved.
"""
import argparse
import os
import platform
import sys
import timeit
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import copy_function, original_technique  # noqa: E402
from visualizer.capture import GetLocal  # noqa: E402


def one_line(x):
    y = x + 1
    return y


def per_call_ns(function, repeat=7, number=200_000):
    best = min(timeit.repeat(lambda: function(1), repeat=repeat, number=number))
    return best / number * 1e9


def bench_one_line():
    bare = copy_function(one_line)
    decorated = copy_function(one_line)
    capture = GetLocal()
    capture("y")(decorated)
    off = per_call_ns(decorated)
    capture.activate()
    on = per_call_ns(decorated)
    capture.clear()
    capture.activate(max_entries=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the bound's one-time notice
        on_bounded = per_call_ns(decorated)
    capture.deactivate()
    original = original_technique("y", {})(copy_function(one_line))
    baseline = per_call_ns(bare)
    # Measured again at the end so drift in machine load shows up.
    baseline = min(baseline, per_call_ns(bare))
    rows = [
        ("undecorated", baseline),
        ("decorated, capture off", off),
        ("decorated, capture on", on),
        ("decorated, capture on, max_entries=100", on_bounded),
        ("original Visualizer technique", per_call_ns(original)),
    ]
    print(f"\n### One-line function, Python {platform.python_version()}\n")
    print("| variant | ns/call | ratio to undecorated |")
    print("|---|---:|---:|")
    for name, ns in rows:
        print(f"| {name} | {ns:.0f} | {ns / baseline:.2f} |")


def bench_vit(device, repeats=25):
    import statistics
    import time

    import torch

    from examples.toy_vit import Attention, VisionTransformer

    class GlobalListAttention(Attention):
        """Today's workaround, the bare cost of copying the maps: edit forward to
        append a copy of `attn` to a global list."""

        maps = []
        copy = None  # set per policy below

        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            GlobalListAttention.maps.append(GlobalListAttention.copy(attn))
            x = (attn @ v).transpose(1, 2).reshape(B, N, C)
            return self.proj(x)

    torch.manual_seed(0)
    # 257 tokens: the maps (about 50 MB per forward) are a real share of the
    # work, so the cost of copying them stands out of the timing noise.
    model = VisionTransformer(img_size=(64, 64), patch_size=4, dim=64, depth=12).eval().to(device)
    images = torch.randn(4, 3, 64, 64, device=device)
    capture = GetLocal()
    capture("attn")(Attention.forward)

    def forward():
        with torch.no_grad():
            model(images)
        if device == "cuda":
            torch.cuda.synchronize()

    def use_attention(cls):
        for block in model.blocks:
            block.attn.__class__ = cls

    copies = {
        "numpy": lambda t: t.detach().to("cpu", copy=True).numpy(),
        "device": lambda t: t.detach().clone(),
    }
    variants = {
        "capture off": (None, None),
        "global list, numpy": ("numpy", None),
        "get_local, numpy": (None, {}),
        "global list, device": ("device", None),
        "get_local, device": (None, {"keep_on_device": True}),
    }
    # On this kind of shared virtual machine wall time swings by 2x from run
    # to run; the process's CPU time with one torch thread, over interleaved
    # repeats, is steadier. On CUDA the GPU's work is not CPU time: wall time.
    clock = time.perf_counter if device == "cuda" else time.process_time
    if device != "cuda":
        torch.set_num_threads(1)
    times = {name: [] for name in variants}
    forward()
    # Round-robin, so drift in machine load touches every variant alike.
    for _ in range(repeats):
        for name, (copy, policy) in variants.items():
            if copy is not None:
                GlobalListAttention.copy = staticmethod(copies[copy])
                use_attention(GlobalListAttention)
            if policy is not None:
                capture.activate(**policy)
            started = clock()
            forward()
            times[name].append((clock() - started) * 1e3)
            capture.deactivate()
            capture.cache.clear()
            GlobalListAttention.maps.clear()
            use_attention(Attention)
    megabytes = 12 * images.shape[0] * 4 * 257 * 257 * 4 / 2**20
    print(f"\n### ViT forward, 12 blocks, batch 4, 257 tokens, {device}: "
          f"{megabytes:.0f} MB of maps per forward; {repeats} interleaved repeats, "
          f"{'wall' if device == 'cuda' else 'CPU'} time, 1 torch thread on CPU\n")
    print("Copying ~50 MB into fresh memory per forward is dominated by page faults and the")
    print("allocator, which vary from run to run: read medians and spreads, not small gaps.\n")
    print("| variant | median ms | min-max ms | median ratio to capture off |")
    print("|---|---:|---:|---:|")
    off = statistics.median(times["capture off"])
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} | "
              f"{statistics.median(values) / off:.2f} |")


def bench_one_capture(device):
    """get_local's own cost per captured tensor, apart from the model around it."""
    import torch

    def returns_its_argument(t):
        attn = t
        return attn

    capture = GetLocal()
    capture("attn")(returns_its_argument)
    rows = []
    for shape in [(4,), (8, 4, 65, 65), (4, 4, 257, 257)]:
        tensor = torch.rand(shape, device=device)
        megabytes = tensor.numel() * 4 / 2**20
        for label, policy, copy in [
            ("numpy on CPU", {}, lambda t: t.detach().to("cpu", copy=True).numpy()),
            ("kept on device", {"keep_on_device": True}, lambda t: t.detach().clone()),
        ]:
            number = 20 if megabytes > 1 else 2000

            # Both sides free each copy before the next one (max_entries=1
            # below), so both recycle memory alike: page faults on fresh
            # memory would otherwise decide the comparison.
            def bare():
                copy(tensor)
                if device == "cuda":
                    torch.cuda.synchronize()

            def captured():
                returns_its_argument(tensor)
                if device == "cuda":
                    torch.cuda.synchronize()

            results = {"bare": [], "captured": []}
            for _ in range(7):  # interleaved, so both see the same machine state
                capture.deactivate()
                results["bare"].append(timeit.timeit(bare, number=number) / number)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # the bound's notice
                    capture.activate(max_entries=1, **policy)
                results["captured"].append(timeit.timeit(captured, number=number) / number)
                capture.cache.clear()
            capture.deactivate()
            bare_us, captured_us = (min(results[k]) * 1e6 for k in ("bare", "captured"))
            rows.append((shape, megabytes, label, bare_us, captured_us))
    print(f"\n### One captured tensor: get_local (max_entries=1) vs the bare copy expression, "
          f"{device}\n")
    print("| tensor | MB | policy | bare copy us | get_local us | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for shape, megabytes, label, bare_us, captured_us in rows:
        print(f"| {tuple(shape)} | {megabytes:.2f} | {label} | {bare_us:.1f} | {captured_us:.1f} | "
              f"{captured_us / bare_us:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args()
    bench_one_line()
    if not args.skip_vit:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("\n(torch not installed: ViT benchmark skipped)")
            return
        bench_one_capture(args.device)
        bench_vit(args.device)


if __name__ == "__main__":
    main()

"""Cost of capture, as ratios against baselines measured in the same run.

    python benchmarks/bench_capture.py            # one-line function (+ ViT if torch is installed)
    python benchmarks/bench_capture.py --device cuda

1. A one-line function: undecorated, decorated with capture off, capture on,
   and the original Visualizer's technique (return a tuple from a rewritten
   code object, unpack it in a wrapper), re-implemented here as a baseline.
   Runs on any Python 3.9+ (torch not needed).
2. A small ViT forward (12 blocks): capture off, the bare cost of copying the
   captured bytes (forward edited to append a copy of `attn` to a global
   list, today's workaround), and get_local. The ratio compares the two
   overheads over the plain forward.
"""
import argparse
import os
import platform
import sys
import timeit
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bytecode import Bytecode, Instr  # noqa: E402

from visualizer.capture import GetLocal  # noqa: E402


def one_line(x):
    y = x + 1
    return y


def original_visualizer_style(varname, store):
    """The original get_local: tuple before the last instruction, plus a wrapper."""

    def decorator(func):
        code = Bytecode.from_code(func.__code__)
        code[-1:-1] = [
            Instr("STORE_FAST", "_res"),
            Instr("LOAD_FAST", varname),
            Instr("STORE_FAST", "_value"),
            Instr("LOAD_FAST", "_res"),
            Instr("LOAD_FAST", "_value"),
            Instr("BUILD_TUPLE", 2),
        ]
        func.__code__ = code.to_code()

        def wrapper(*args, **kwargs):
            result, value = func(*args, **kwargs)
            store.append(value)
            return result

        return wrapper

    return decorator


def copy_function(source):
    return type(source)(source.__code__, source.__globals__, source.__name__)


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
    original = original_visualizer_style("y", [])(copy_function(one_line))
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


def bench_vit(device):
    import torch

    from examples.toy_vit import Attention, VisionTransformer

    class GlobalListAttention(Attention):
        """Today's workaround, the bare cost of copying the maps: edit forward to
        append a copy of `attn` to a global list."""

        maps = []

        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            GlobalListAttention.maps.append(self.copy(attn))
            del GlobalListAttention.maps[:-12]
            x = (attn @ v).transpose(1, 2).reshape(B, N, C)
            return self.proj(x)

    torch.manual_seed(0)
    model = VisionTransformer(img_size=(64, 64), patch_size=8, dim=64, depth=12).eval().to(device)
    images = torch.randn(8, 3, 64, 64, device=device)
    capture = GetLocal()
    capture("attn")(Attention.forward)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            model(images)
        sync()

    def timed(number=20, repeat=7):
        forward()
        return min(timeit.repeat(forward, number=number, repeat=repeat)) / number * 1e3

    def set_attention_class(cls):
        for block in model.blocks:
            block.attn.__class__ = cls

    policies = [
        ("numpy on CPU (default)", {}, lambda t: t.detach().to("cpu", copy=True).numpy()),
        ("kept on device", {"keep_on_device": True}, lambda t: t.detach().clone()),
    ]
    rows = []
    for label, policy, copy in policies:
        off = timed()
        GlobalListAttention.copy = staticmethod(copy)
        set_attention_class(GlobalListAttention)
        manual = timed()
        set_attention_class(Attention)
        capture.activate(max_entries=12, **policy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the bound's one-time notice
            on = timed()
        megabytes = sum(m.nbytes if hasattr(m, "nbytes") else m.numel() * m.element_size()
                        for m in capture.cache["Attention.forward"]) / 2**20
        capture.deactivate()
        capture.cache.clear()
        rows.append((label, off, manual, on, megabytes))
    print(f"\n### ViT forward, 12 blocks, batch 8, 65 tokens, {device}\n")
    print("| policy | capture off ms | global-list copy ms | get_local ms | "
          "get_local overhead / copy overhead | MiB kept |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, off, manual, on, megabytes in rows:
        ratio = (on - off) / (manual - off) if manual > off else float("nan")
        print(f"| {label} | {off:.2f} | {manual:.2f} | {on:.2f} | {ratio:.2f} | {megabytes:.1f} |")


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
        bench_vit(args.device)


if __name__ == "__main__":
    main()

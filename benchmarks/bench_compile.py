"""capture_attention and sdpa_capture on torch.compile'd models (inductor, CPU): recording from the graph.

Section (d) of run_all.py, also runnable alone:

    python benchmarks/bench_compile.py                 # ~30 minutes on 2 idle cores
    python benchmarks/bench_compile.py --rounds 5      # fewer rounds
    python benchmarks/bench_compile.py --quick         # 224 px and the LM only, 2 rounds

Models (random weights, torch.no_grad(), batch 1, one torch thread):
ViT-S/14 (12 blocks, dim 384, 6 heads, F.scaled_dot_product_attention, as
timm's fused_attn) in DINOv2's geometry at 224 px (257 tokens) and 518 px
(1370 tokens), and a small causal LM (4 blocks, dim 256, 4 heads, 256 tokens,
SDPA with is_causal=True). Each compiled with `torch.compile(model)` (inductor).

Variants, interleaved (one forward of each per round, in a new seeded order),
capture switched on before and off after each forward, outside the timed
region: the compiled forward (the baseline); compiled with
`capture_attention(model, rows=0)` (the CLS / first query row of every layer)
and with full maps, both recorded from the compiled graph; the same with
`sdpa_capture` (the weights computed in the graph beside the kernel); the forced-eager
path (Dynamo's `force_eager` stance with `capture_attention(rows=0)`: what
capture of a compiled model cost before it recorded from the graph); and the
same weights uncompiled, plain and with full maps. Ratios are paired per round.

Compile time: the wall time of the first call after `torch._dynamo.reset()`,
without capture and with `capture_attention(rows=0)` switched on, inductor's
caches disabled (cold compiles).

get_local inside compiled code (`get_local_section`, also `--get-local` alone):
the same ViT-S/14 at 224 px with timm's explicit attention (`attn` a local),
`Attention.forward` decorated with `get_local('attn')`: compiled, and compiled
with capture on (the recorder traced into the graph, full maps), against the
path before torch 2.11 / with `select=` (the decorated function runs eagerly,
a graph break around each attention: a second model whose forward is decorated
with `select=`, left switched on), and the eager forward plain and captured.
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def causal_lm_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads = num_heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            batch, tokens, dim = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
            return x + self.mlp(self.norm2(x))

    class CausalLM(nn.Module):
        def __init__(self, vocab=1000, dim=256, depth=4, num_heads=4, context=256):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.position = nn.Parameter(torch.randn(1, context, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
            self.head = nn.Linear(dim, vocab)

        def forward(self, ids):
            x = self.embed(ids) + self.position[:, : ids.shape[1]]
            return self.head(self.blocks(x))

    return CausalLM


def geometries(quick):
    vit = [("ViT-S/14, 224 px, 257 tokens", 224)]
    if not quick:
        vit.append(("ViT-S/14, 518 px, 1370 tokens", 518))
    return vit + [("causal LM, 4 blocks, 256 tokens", None)]


def build(size):
    """(model, input) with seeded weights: a fused ViT-S/14 at `size` px, or the causal LM."""
    import torch

    from _common import attention_variant, copy_function, fused_attention_forward
    from _common import use_attention, vit_classes

    torch.manual_seed(0)
    if size is None:
        return causal_lm_class()().eval(), torch.randint(0, 1000, (1, 256))
    _, VisionTransformer = vit_classes()
    model = VisionTransformer(size, 14).eval()
    use_attention(
        model,
        attention_variant("Attention", copy_function(fused_attention_forward, "Attention.forward")),
    )
    return model, torch.randn(1, 3, size, size)


def compile_times(model, inputs):
    """Wall seconds of the first compiled call, without and with capture switched on."""
    import torch

    from visualizer import capture_attention, sdpa_capture

    from torch._inductor import config as inductor_config

    times = {}
    # Cold compiles: inductor's on-disk caches would otherwise serve an earlier run's code.
    caches = inductor_config.force_disable_caches
    inductor_config.force_disable_caches = True
    for name, capture in (("plain", False), ("capture_attention(rows=0)", True)):
        torch._dynamo.reset()
        compiled = torch.compile(model)
        started = time.perf_counter()
        with torch.no_grad():
            if capture:
                with capture_attention(compiled, rows=0):
                    compiled(inputs)
            else:
                compiled(inputs)
        times[name] = time.perf_counter() - started
    inductor_config.force_disable_caches = caches
    torch._dynamo.reset()
    return times


def no_grad_forward(module, inputs):
    """A slot's timed body: one forward of `module` on `inputs` under torch.no_grad()."""
    import torch

    def body():
        with torch.no_grad():
            return module(inputs)

    return body


def ratio_table(report, label, slots, times, main):
    """Append the table of `slots`' times (clock `main`) and their paired ratios to the
    slots named "compiled" and "eager (not compiled)"; returns those two baselines."""
    from run_all import cell
    from _common import paired_ratios

    compiled_plain = times["compiled"][main]
    eager_plain = times["eager (not compiled)"][main]
    report.append(f"### {label}\n")
    report.append(f"| variant | {main} ms | ÷ compiled | ÷ eager |")
    report.append("|---|---:|---:|---:|")
    for slot in slots:
        values = times[slot.name][main]
        report.append(
            f"| {slot.name} | {cell(values, 1)} | "
            f"{cell(paired_ratios(values, compiled_plain), 3)} | "
            f"{cell(paired_ratios(values, eager_plain), 3)} |"
        )
    return compiled_plain, eager_plain


def compile_section(args, report, clocks):
    import torch

    from run_all import Slot, cell, log, measure, run_slot
    from _common import paired_ratios, quartiles
    from visualizer import capture_attention, sdpa_capture

    log("(d) compiled models: capture from the graph")
    report.append("## (d) Compiled models (inductor, CPU): capture from the graph\n")
    report.append(
        f"Batch 1, torch.no_grad(), {args.clock} ms per forward, {args.rounds} interleaved "
        "rounds: median (interquartile range); ratios paired per round. Capture is switched on "
        "before and off after each forward, outside the timed region. Goals: rows=0 ≤ 1.05× "
        "the compiled forward at 518 px; full maps compiled ÷ compiled plain ≤ full maps "
        "eager ÷ eager plain.\n"
    )
    summary = []
    for label, size in geometries(args.quick):
        model, inputs = build(size)
        log(f"    {label}: compile times")
        compiled_seconds = compile_times(model, inputs)
        compiled = torch.compile(model)
        context = {}

        def run(module):
            return no_grad_forward(module, inputs)

        def enter(make):
            def begin():
                context["manager"] = make()
                context["manager"].__enter__()
            return begin

        def leave():
            context.pop("manager").__exit__(None, None, None)

        class ForcedEager:
            """Dynamo's force_eager stance, with capture: the path before graphs recorded."""

            def __enter__(self):
                self.stance = torch.compiler.set_stance("force_eager")
                self.stance.__enter__()
                self.recorder = capture_attention(compiled, rows=0)
                self.recorder.start()

            def __exit__(self, *exc):
                self.recorder.stop()
                self.stance.__exit__(*exc)

        slots = [
            Slot("compiled", run(compiled)),
            Slot("compiled + capture_attention(rows=0)", run(compiled),
                 enter(lambda: capture_attention(compiled, rows=0)), leave),
            Slot("compiled + capture_attention, full maps", run(compiled),
                 enter(lambda: capture_attention(compiled)), leave),
            Slot("compiled + sdpa_capture(rows=0)", run(compiled),
                 enter(lambda: sdpa_capture.capture(rows=0)), leave),
            Slot("compiled + sdpa_capture, full maps", run(compiled),
                 enter(lambda: sdpa_capture.capture()), leave),
            Slot("forced eager + capture_attention(rows=0)", run(compiled),
                 enter(ForcedEager), leave),
            Slot("eager (not compiled)", run(model)),
            Slot("eager + capture_attention, full maps", run(model),
                 enter(lambda: capture_attention(model)), leave),
        ]
        log(f"    {label}: warm-up (compiles the captured graphs)")
        for slot in slots:
            run_slot(slot, clocks)
        times = measure(slots, args.rounds, clocks, label)
        main = args.clock
        compiled_plain, eager_plain = ratio_table(report, label, slots, times, main)
        report.append("")
        def median_ratio(name, baseline):
            return quartiles(paired_ratios(times[name][main], baseline))[1]

        rows0 = median_ratio("compiled + capture_attention(rows=0)", compiled_plain)
        full_compiled = median_ratio("compiled + capture_attention, full maps", compiled_plain)
        full_eager = median_ratio("eager + capture_attention, full maps", eager_plain)
        forced = median_ratio("forced eager + capture_attention(rows=0)", compiled_plain)
        sdpa_rows0 = median_ratio("compiled + sdpa_capture(rows=0)", compiled_plain)
        sdpa_full = median_ratio("compiled + sdpa_capture, full maps", compiled_plain)
        report.append(
            f"Compile time (first call, wall): {compiled_seconds['plain']:.1f} s plain, "
            f"{compiled_seconds['capture_attention(rows=0)']:.1f} s with capture on.\n"
        )
        summary.append(
            f"| {label} | {rows0:.3f}× | {sdpa_rows0:.3f}× | {forced:.2f}× | {full_compiled:.2f}× "
            f"| {sdpa_full:.2f}× | {full_eager:.2f}× | {compiled_seconds['plain']:.0f} s / "
            f"{compiled_seconds['capture_attention(rows=0)']:.0f} s |"
        )
        del compiled
        torch._dynamo.reset()
    report.append("Summary (medians of paired ratios):\n")
    report.append(
        "| model | compiled rows=0 ÷ compiled | sdpa_capture rows=0 ÷ compiled | forced eager "
        "rows=0 ÷ compiled | compiled full ÷ compiled | sdpa_capture full ÷ compiled | eager "
        "full ÷ eager | compile plain / with capture |"
    )
    report.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    report.extend(summary)
    report.append("")


def get_local_section(args, report, clocks):
    """get_local on a compiled explicit-attention ViT-S/14 at 224 px: from the graph vs eagerly."""
    import torch

    from run_all import Slot, cell, log, measure, run_slot
    from _common import attention_forward, attention_variant, copy_function, paired_ratios
    from _common import quartiles, use_attention, vit_classes
    from visualizer.capture import GetLocal

    log("(d) compiled models: get_local from the graph")
    _, VisionTransformer = vit_classes()
    in_graph, eager_path = GetLocal(), GetLocal()
    models = {}
    for name, decorate in (("graph", in_graph("attn")),
                           ("eager", eager_path("attn", select=lambda attn: attn))):
        torch.manual_seed(0)
        model = VisionTransformer(224, 14).eval()
        forward = decorate(copy_function(attention_forward, f"{name}.Attention.forward"))
        use_attention(model, attention_variant(f"{name}.Attention", forward))
        models[name] = model
    inputs = torch.randn(1, 3, 224, 224)
    compiled = {name: torch.compile(model) for name, model in models.items()}
    eager_path.activate()  # on throughout: switching it would reset Dynamo each time
    context = {}

    def run(module):
        return no_grad_forward(module, inputs)

    def begin():
        context["block"] = in_graph.capture()
        context["block"].__enter__()

    def end():
        context.pop("block").__exit__(None, None, None)

    slots = [
        Slot("compiled", run(compiled["graph"])),
        Slot("compiled + get_local, from the graph", run(compiled["graph"]), begin, end),
        Slot("compiled + get_local, eagerly between graphs", run(compiled["eager"]),
             end=eager_path.clear),
        Slot("eager (not compiled)", run(models["graph"])),
        Slot("eager + get_local", run(models["graph"]), begin, end),
    ]
    log("    warm-up (compiles every variant)")
    # Twice: the first switch of `in_graph` resets Dynamo (its code was compiled
    # from the function's original code), which drops what was compiled before it.
    for slot in slots + slots:
        run_slot(slot, clocks)
    label = "ViT-S/14, 224 px, explicit attention, get_local('attn')"
    times = measure(slots, args.rounds, clocks, label)
    eager_path.deactivate()
    main = args.clock
    compiled_plain, eager_plain = ratio_table(report, label, slots, times, main)

    def median_ratio(name, baseline):
        return quartiles(paired_ratios(times[name][main], baseline))[1]

    report.append(
        "\nSummary: compiled + get_local from the graph "
        f"{median_ratio('compiled + get_local, from the graph', compiled_plain):.2f}× the "
        "compiled forward; eagerly between graphs "
        f"{median_ratio('compiled + get_local, eagerly between graphs', compiled_plain):.2f}×; "
        f"eager + get_local {median_ratio('eager + get_local', eager_plain):.2f}× the eager "
        "forward.\n"
    )
    del compiled
    torch._dynamo.reset()


def main():
    import torch

    from _common import machine_lines
    from run_all import CLOCKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--get-local", action="store_true",
                        help="only get_local inside compiled code")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    torch.set_num_threads(args.threads)
    report = ["# Compiled-model capture (`python benchmarks/bench_compile.py`)\n"]
    report.extend(machine_lines(torch))
    report.append("")
    if not args.get_local:
        compile_section(args, report, CLOCKS)
    get_local_section(args, report, CLOCKS)
    print("\n".join(report))


if __name__ == "__main__":
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # capture's once-only notices
        main()

"""Every benchmark figure of benchmarks/README.md in one command, each with its spread.

    python benchmarks/run_all.py                       # everything: ~20 minutes on 2 idle cores
    python benchmarks/run_all.py --quick               # smoke run, about 1-2 minutes
    python benchmarks/run_all.py --only recorder fused # some sections (a/recorder, b/forwards,
                                                       # c/fused, d/compile)
    python benchmarks/run_all.py --markdown out.md     # also write the report to a file
    python benchmarks/run_all.py --rounds 50 --threads 2 --clock wall

The report (markdown, ready to paste into benchmarks/README.md) goes to stdout; progress
goes to stderr. Every figure is measured in this run, in this process (section
(a): one subprocess per Python), variants interleaved: one measurement of each
variant per round, so drift in the machine's load touches all variants alike.
Whole forwards run in a new (seeded) random order every round: a forward's
page faults cost more or less depending on what the one before it freed or
kept (on this project's VM, up to 2x), so no variant may always follow the
same neighbour. Section (a) rotates the starting variant instead.
Ratios are paired: computed per round against the baseline measured in that
same round, then summarised as median (interquartile range).

(a) recorder: the cost of capture on a one-line function
    `def f(x): y = x + 1; return y`, in ns per call, on every Python found
    (default: .venvs/core-3.X made by `bash .ci/core_matrix`, else /tmp/venv-3.X,
    for 3.9 ... 3.13, each with bytecode and numpy;
    `--pythons` to choose), each run in a subprocess with PYTHONPATH set to
    this repository (`visualizer.capture` imports without torch).
    Variants: undecorated; decorated with capture off; capture on (unbounded,
    the list cleared after every timing as a train/look/clear loop would);
    capture on with `max_entries=100` and `max_entries=10_000` (the cache
    kept full, so every call drops one entry: the steady state of a bounded
    cache); and the original Visualizer's technique, re-implemented from its
    published description: the decorator rewrites the code object to build
    `(result, value)` before the return instruction, and a wrapper unpacks
    the tuple and appends the value to a list.

(b) forwards: a timm-style ViT-S (12 blocks, dim 384, 6 heads, MLP ratio 4,
    random weights; `attn = (q @ k.transpose(-2, -1) * scale).softmax(-1)`)
    under torch.no_grad(), ViT-S/16 at 224 px batch 8 (197 tokens) and
    ViT-S/14 at 518 px batch 1 (DINOv2's geometry: 37x37 + CLS = 1370 tokens).
    Variants: plain forward (capture off); get_local('attn') with the default
    policy (numpy copy), keep_on_device=True, dtype='float16'; the original
    technique with its wrapper doing `value.detach().cpu().numpy().copy()`
    (on the CPU, `.numpy()` alone shares the tensor's memory: `.copy()` makes
    it store a copy, as get_local does); `capture_attention(model)` (full maps,
    on the model whose forward carries no decorator: its softmax watch);
    get_local (default and keep_on_device=True) and capture_attention in a
    capture/look/clear loop with capture kept on, where the previous forward's
    maps, cleared, are the destinations of the copies (the buffer pool; that
    forward runs untimed before the timed one);
    TorchLens, if installed, saving the 12 softmax outputs; and the copy
    bound: the same bytes (the 12 maps of one forward, kept from the warm-up)
    copied with np.copyto into warm buffers allocated once, and into fresh
    buffers allocated per map and forward by torch (the allocator get_local's
    copies use) and by numpy (the original technique's `.copy()`; numpy
    madvises huge pages for large arrays, torch does not). Switching capture
    on and off, and clearing what was stored (get_local.clear() and the
    like, as a train/look/clear loop does), happen outside the timed region
    after every forward; the garbage collector is off inside it and run
    outside it. Figures: ms per forward; ratio to the plain forward of the
    same round; and (variant - plain) / warm copy of the same round, the
    overhead of capture in units of the bare cost of copying the maps (the
    issue's "overhead / copy bound"), and the same over the fresh torch copy.

(c) fused: the same ViT-S/14 at 518 px with F.scaled_dot_product_attention
    (timm's fused_attn): the plain fused forward against `sdpa_capture` and
    `capture_attention(model, rows=0)` recording the CLS query row of every
    layer (goal: at most 1.05x), and the same two recording full maps, which
    they must compute, against the eager forward of the same weights; full
    maps also in a capture/look/clear loop, where they are computed into the
    previous forward's cleared maps (the buffer pool).

(d) compile: the fused ViT-S/14 at 224 and 518 px and a small causal LM
    compiled with inductor: compiled + `capture_attention(rows=0)` and full
    maps (recorded from the graph), the forced-eager path, and the same
    weights uncompiled, against the compiled forward; compile time with and
    without capture (see benchmarks/bench_compile.py).

Clock (`--clock`): by default this process's CPU time (user + system) with one
torch thread: on a shared machine the time other processes take is not
counted, and a single thread spends no time spin-waiting for a busy core, so
it is what the wall time would be on an idle machine. `--clock wall` times
wall-clock instead; the other clock's median is reported beside it.
"""
import argparse
import importlib.util
import gc
import glob
import json
import random
import os
import subprocess
import sys
import time
import timeit
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import (  # noqa: E402
    REPO,
    attention_forward,
    attention_variant,
    copy_function,
    load_average,
    fused_attention_forward,
    machine_lines,
    original_technique,
    paired_ratios,
    peak_rss_mib,
    quartiles,
    source_digest,
    spread,
    use_attention,
    vit_classes,
)

SECTIONS = {"a": "recorder", "b": "forwards", "c": "fused", "d": "compile"}
PYTHON_VERSIONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated(items, shift):
    """`items` starting at position `shift` (round-robin with a rotating start)."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def cell(values, digits, unit=""):
    """'median (Q1–Q3)' for a list, or '—' for an empty one."""
    return spread(values, digits, unit) if values else "—"


# =============================================================================
# (a) recorder cost on a one-line function: runs in a child per interpreter
# =============================================================================


def one_line(x):
    y = x + 1
    return y


def recorder_child(settings):
    """In a child interpreter: ns per call of each variant, per round, as JSON."""
    import platform

    digest = source_digest()  # the code this child imports, as near as can be told
    from visualizer.capture import GetLocal

    rounds, number = settings["rounds"], settings["number"]
    clock = CLOCKS[settings["clock"]]
    if settings.get("torch"):
        # Loaded before capture is on, as in a model's process: immutable
        # values then also pay the check for activation-checkpoint recompute.
        import torch  # noqa: F401
    warnings.simplefilter("ignore", RuntimeWarning)  # the bound's one-time notice

    def decorated(**policy):
        """A copy of one_line decorated by its own GetLocal (own cache), on with `policy`."""
        capture = GetLocal()
        function = capture("y")(copy_function(one_line))
        if policy.pop("on", True):
            capture.activate(**policy)
        return function, capture

    def kept_instrumented():
        """A copy switched on in the form torch.compile traces, then off as it is once
        torch.compile has compiled anything: still instrumented, its recorder global None
        (see GetLocal._settle)."""
        from visualizer import capture as capture_module

        forced = capture_module._records_in_graphs
        capture_module._records_in_graphs = lambda: True
        try:
            function, capture = decorated()
        finally:
            capture_module._records_in_graphs = forced
        capture._registrations.get(function).template.bind(function.__globals__, False)
        return function

    store = {}
    try:
        original = original_technique("y", store)(copy_function(one_line))
        bytecode_version = __import__("bytecode").__version__
    except ImportError:
        original, bytecode_version = None, None

    unbounded, unbounded_capture = decorated()
    # name -> (function, clear after each timing or None). Each decorated variant
    # has its own GetLocal, so clearing one cache leaves the bounded ones full.
    variants = {
        "undecorated": (copy_function(one_line), None),
        "capture off": (decorated(on=False)[0], None),
        "capture off, kept instrumented": (kept_instrumented(), None),
        "capture on": (unbounded, unbounded_capture.clear),
        "capture on, max_entries=100": (decorated(max_entries=100)[0], None),
        "capture on, max_entries=10000": (decorated(max_entries=10_000)[0], None),
    }
    if original is not None:
        variants["original technique"] = (original, store["one_line"].clear)
    timers = {
        name: timeit.Timer("f(1)", globals={"f": function}, timer=clock)
        for name, (function, _) in variants.items()
    }
    # Warm up, and fill the bounded caches: every timed call then drops one entry.
    for name, (_, clear) in variants.items():
        timers[name].timeit(max(number // 10, 10_100))
        if clear is not None:
            clear()
    names = list(variants)
    results = {name: [] for name in names}
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            results[name].append(timers[name].timeit(number) / number * 1e9)
            clear = variants[name][1]
            if clear is not None:
                clear()
    return {
        "python": platform.python_version() + (" + torch" if settings.get("torch") else ""),
        "implementation": sys.implementation.name,
        "bytecode": bytecode_version,
        "capture_module": sys.modules["visualizer.capture"].__file__,
        "digest": digest,
        "ns": results,
    }


def find_pythons(requested):
    """[(label, interpreter path)]: the requested ones, or for each 3.X the core matrix's
    venv (.venvs/core-3.X, made by `bash .ci/core_matrix`) or /tmp/venv-3.X."""
    if requested:
        return [(path, path) for path in requested], []
    found, missing = [], []
    repository = Path(__file__).resolve().parents[1]
    for version in PYTHON_VERSIONS:
        candidates = [repository / f".venvs/core-{version}/bin/python",
                      Path(f"/tmp/venv-{version}/bin/python")]
        candidate = next((c for c in candidates if c.exists()), None)
        if candidate is not None:
            found.append((version, str(candidate)))
        elif sys.version_info[:2] == tuple(map(int, version.split("."))):
            found.append((version, sys.executable))
        else:
            pyenv = sorted(glob.glob(f"/root/.pyenv/versions/{version}.*/bin/python"))
            missing.append(
                f"Python {version}: no /tmp/venv-{version} (create it with "
                f"`{pyenv[-1] if pyenv else f'python{version}'} -m venv /tmp/venv-{version}` "
                "and `pip install bytecode numpy` in it)"
            )
    return found, missing


def recorder_section(args, report):
    log("(a) recorder cost on a one-line function")
    pythons, missing = find_pythons(args.pythons)
    settings = {"rounds": args.recorder_rounds, "number": args.number, "clock": args.clock}
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else [])
    )
    environment.pop("VISUALIZER_CAPTURE", None)
    runs, failures = [], list(missing)
    children = [(label, python, settings) for label, python in pythons]
    if importlib.util.find_spec("torch") is not None:
        children.append((f"{sys.version.split()[0]} with torch imported", sys.executable,
                         {**settings, "torch": True}))
    for label, python, child_settings in children:
        log(f"    Python {label}: {python}")
        command = [python, str(Path(__file__).resolve()), "--child-recorder",
                   json.dumps(child_settings)]
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            failures.append(f"{python}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
            continue
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))

    report.append("## (a) Recorder cost: one-line function\n")
    report.append(
        f"`def f(x): y = x + 1; return y`, ns per call ({args.clock} clock, timeit loop "
        f"included), {settings['rounds']} interleaved rounds of {args.number:,} calls each. "
        "Cells: median ns; ratio to the undecorated function of the same round, median "
        "(interquartile range). *Capture on*: `get_local.activate()`, unbounded, the cache "
        "cleared after every timing (as a train/look/clear loop would); *original technique*: "
        "the original Visualizer's rewrite (the code returns `(result, y)`, a wrapper unpacks it "
        "and appends `y` to a list, cleared likewise). *Kept instrumented*: capture off as it "
        "is once torch.compile has compiled anything in the process (the instrumented code "
        "stays, its recorder global None: one load and a test per return).\n"
    )
    report.append(
        "| Python | undecorated | decorated, capture off | capture off, kept instrumented "
        "| capture on | original technique | capture on ÷ original |"
    )
    report.append("|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        ns = run["ns"]
        base = ns["undecorated"]

        def versus(name, baseline=base):
            if name not in ns:
                return "n/a"
            low, median, high = quartiles(paired_ratios(ns[name], baseline))
            return f"{quartiles(ns[name])[1]:.0f} ns, ×{median:.2f} ({low:.2f}–{high:.2f})"

        against_original = (
            cell(paired_ratios(ns["capture on"], ns["original technique"]), 2)
            if "original technique" in ns
            else "n/a"
        )
        report.append(
            f"| {run['python']} | {quartiles(base)[1]:.0f} ns ({quartiles(base)[0]:.0f}–"
            f"{quartiles(base)[2]:.0f}) | {versus('capture off')} | "
            f"{versus('capture off, kept instrumented')} | {versus('capture on')} | "
            f"{versus('original technique')} | {against_original} |"
        )
    report.append("")
    report.append(
        "Bounded cache (`get_local.activate(max_entries=...)`), kept full so that every call "
        "drops its oldest entry, against unbounded capture in the same round: median ns; ratio "
        "to unbounded, median (interquartile range).\n"
    )
    report.append("| Python | capture on, unbounded | max_entries=100 | max_entries=10_000 |")
    report.append("|---|---:|---:|---:|")
    for run in runs:
        ns = run["ns"]
        unbounded = ns["capture on"]
        cells = []
        for name in ("capture on, max_entries=100", "capture on, max_entries=10000"):
            low, median, high = quartiles(paired_ratios(ns[name], unbounded))
            cells.append(f"{quartiles(ns[name])[1]:.0f} ns, ×{median:.2f} ({low:.2f}–{high:.2f})")
        report.append(
            f"| {run['python']} | {quartiles(unbounded)[1]:.0f} ns | {cells[0]} | {cells[1]} |"
        )
    report.append("")
    if runs:
        versions = ", ".join(
            f"{run['python']} (bytecode {run['bytecode'] or 'missing'})" for run in runs
        )
        digests = sorted({run["digest"] for run in runs})
        report.append(f"Interpreters: {versions}; capture core from "
                      f"`{Path(runs[0]['capture_module']).parent}`, sources sha256 "
                      f"{', '.join(digests)}"
                      + (" (the sources changed between interpreters!)" if len(digests) > 1
                         else "") + ".")
    for failure in failures:
        report.append(f"\n- Not measured: {failure}")
    report.append("")


# =============================================================================
# (b) and (c): whole forwards
# =============================================================================


class Slot:
    """One variant of a section: what runs outside the timed region, and inside it."""

    def __init__(self, name, body, begin=None, end=None, maps=None, forward=True):
        self.name = name
        self.body = body  # timed; returns what must live until the timing is over
        self.begin = begin  # before timing: switch capture on
        self.end = end  # after timing: switch off and clear what was stored
        self.maps = maps  # after timing, before end: the stored maps (warm-up checks)
        self.forward = forward  # a model forward (False: a bare copy)


def after_a_cleared_forward(begin, body, clear):
    """A slot's begin for a capture/look/clear loop: `begin`, then one untimed forward whose
    maps `clear` hands to the buffer pool, so that the timed forward copies into them."""
    def pooled_begin():
        begin()
        body()
        clear()
    return pooled_begin


def run_slot(slot, clocks, inspect=None):
    """Run one slot: (times by clock name, `inspect(stored maps)` or None).

    The maps are only lent to `inspect`: whatever it does not keep is freed with
    the rest when the slot ends.
    """
    if slot.begin is not None:
        slot.begin()
    gc.disable()
    try:
        starts = {name: clock() for name, clock in clocks.items()}
        kept = slot.body()
        times = {name: (clock() - starts[name]) * 1e3 for name, clock in clocks.items()}
    finally:
        gc.enable()
    looked = None
    if inspect is not None and slot.maps is not None:
        looked = inspect(slot.maps(kept))
    del kept
    if slot.end is not None:
        slot.end()
    gc.collect()
    return times, looked


def measure(slots, rounds, clocks, label):
    """{slot name: {clock: [ms per round]}}, slots interleaved in a new order each round."""
    times = {slot.name: {name: [] for name in clocks} for slot in slots}
    # What exists now (modules, models, maps kept for the copies) is never
    # garbage: frozen, so the collection after every slot scans only what the
    # slot made (a full collection takes ~0.2 s with torch and TorchLens loaded).
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    order = random.Random(0)  # seeded: a rerun measures in the same orders
    for round_index in range(rounds):
        for slot in order.sample(slots, len(slots)):
            measured, _ = run_slot(slot, clocks)
            for name, value in measured.items():
                times[slot.name][name].append(value)
        if round_index == 0 or (round_index + 1) % 5 == 0:
            elapsed = time.perf_counter() - started
            log(f"    {label}: round {round_index + 1}/{rounds}, {elapsed:.0f} s")
    gc.unfreeze()
    return times


def nbytes(value):
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    return value.numel() * value.element_size()


def as_numpy(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    return value.detach().float().cpu().numpy()


def torchlens_status():
    """(module or None, description)."""
    try:
        import torchlens
    except Exception as error:  # noqa: BLE001 - any failure to import is reported
        return None, f"not available ({type(error).__name__}: {error})"
    version = getattr(torchlens, "__version__", "unknown version")
    if not hasattr(torchlens, "trace"):
        return None, f"torchlens {version} has no `trace`: not measured"
    return torchlens, f"torchlens {version}"


def torchlens_slot(torchlens, model, images, no_grad):
    from torchlens.options import CaptureOptions

    # unwrap_when_done: TorchLens otherwise leaves every torch function wrapped
    # after the call, which would slow the other variants of the round down.
    options = CaptureOptions(unwrap_when_done=True)
    selector = torchlens.func("softmax")

    def body():
        with no_grad():
            return torchlens.trace(model, images, save=selector, capture=options)

    def maps(trace):
        return [
            trace[label].out
            for label in trace.layer_labels
            if label.startswith("softmax") and trace[label].out is not None
        ]

    return Slot("TorchLens, 12 softmax outputs", body, maps=maps)


def forward_geometries(quick):
    # (label, image size, patch, batch)
    if quick:
        return [("112 px, ViT-S/16, batch 8", 112, 16, 8),
                ("224 px, ViT-S/14, batch 1", 224, 14, 1)]
    return [("224 px, ViT-S/16, batch 8", 224, 16, 8),
            ("518 px, ViT-S/14, batch 1", 518, 14, 1)]


def forwards_section(args, report, clocks):
    from visualizer import get_local

    log("(b) whole forwards")
    Attention, _ = vit_classes()
    Decorated = attention_variant(
        "Attention", get_local("attn")(copy_function(attention_forward, "Attention.forward"))
    )
    key = get_local.key_of(Decorated.forward)
    original_store = {}
    Original = attention_variant(
        "Attention",
        original_technique(
            "attn", original_store, copy=lambda value: value.detach().cpu().numpy().copy()
        )(copy_function(attention_forward, "Attention.forward")),
    )
    torchlens, torchlens_note = torchlens_status()
    log(f"    TorchLens: {torchlens_note}")

    report.append("## (b) Whole forwards: ViT-S, full attention maps\n")
    report.append(
        f"{args.clock} ms per forward under torch.no_grad(), {args.rounds} interleaved rounds "
        "(after one warm-up forward of each variant): median (interquartile range); ratio to "
        "the plain forward of the same round; (variant − plain) ÷ warm copy of the same round, "
        "the overhead in units of the bare cost of copying the maps. Caches are cleared after "
        f"every forward, outside the timed region. The `{'wall' if args.clock == 'cpu' else 'cpu'}"
        " ms` column is the other clock's median.\n"
    )
    variants = dict(Attention=Attention, Decorated=Decorated, Original=Original, key=key,
                    original_store=original_store, torchlens=torchlens)
    for label, size, patch, batch in forward_geometries(args.quick):
        forward_geometry(args, report, clocks, label, size, patch, batch, **variants)
        gc.collect()
    get_local.activate()  # back to the default storage policy, off
    get_local.deactivate()
    report.append(
        "Variants: *original technique + .copy()*: the original Visualizer's rewrite "
        "(the code returns `(result, attn)`, a wrapper unpacks it) storing "
        "`attn.detach().cpu().numpy().copy()`; *capture_attention(model)*: model-level capture "
        "of full maps on the undecorated model (its softmax watch), recorder started before and "
        "stopped after each forward, outside the timed region; "
        f"*TorchLens*: {torchlens_note}"
        + (", `torchlens.trace(model, x, save=torchlens.func('softmax'), "
           "capture=CaptureOptions(unwrap_when_done=True))`, which keeps torch tensors (clones)"
           if torchlens is not None else "")
        + ". *Copies*: np.copyto of the 12 maps of one forward (kept from the warm-up) into "
        "buffers allocated once (*warm*: the copy bound, the denominator of the 'warm copy' "
        "column), or allocated per forward, page faults included, by torch (*fresh torch "
        "buffers*, the allocator get_local's, capture_attention's and TorchLens' copies use: "
        "the denominator of the 'fresh copy' column) or by numpy (*fresh numpy buffers*, the "
        "allocator of the original technique's `.copy()`). For the copy rows the two ratio "
        "columns are, in italics, the copy's time ÷ the warm and ÷ the fresh torch copy. "
        "numpy asks the kernel for transparent huge pages for large arrays and torch does not: "
        "where THP defrag is 'madvise' (see the machine lines) a fresh numpy buffer can cost far "
        "more than a torch one, and that shows in the original technique's row.\n"
    )
    report.append(f"Peak resident memory of the process so far: {peak_rss_mib():.0f} MiB.\n")


def forward_geometry(args, report, clocks, label, size, patch, batch, *, Attention, Decorated,
                     Original, key, original_store, torchlens):
    """Section (b) for one geometry: the interleaved rounds and their table."""
    import numpy as np
    import torch

    from visualizer import capture_attention, get_local

    _, VisionTransformer = vit_classes()
    no_grad = torch.no_grad
    torch.manual_seed(0)
    model = VisionTransformer(size, patch).eval()
    images = torch.randn(batch, 3, size, size)
    tokens = (size // patch) ** 2 + 1
    log(f"    {label}: {tokens} tokens")

    def body():
        with no_grad():
            return model(images)

    def using(cls, switch_on=None):
        """Before timing: the model's attention modules become `cls`, capture goes on."""
        def begin():
            use_attention(model, cls)
            if switch_on is not None:
                switch_on()
        return begin

    def get_local_off():
        get_local.deactivate()
        get_local.clear()

    recorder = {}

    def start_recorder():
        recorder["on"] = capture_attention(model)
        recorder["on"].start()

    def stop_recorder():
        recorder["on"].stop()
        del recorder["on"]

    # Capture off: the decorated class, running its original code object.
    slots = [Slot("plain forward (capture off)", body, using(Decorated))]
    for name, policy in [
        ("get_local, default (numpy copy)", {}),
        ("get_local, keep_on_device=True", {"keep_on_device": True}),
        ("get_local, dtype='float16'", {"dtype": "float16"}),
    ]:
        slots.append(Slot(
            name, body, using(Decorated, lambda policy=policy: get_local.activate(**policy)),
            get_local_off, maps=lambda _: list(get_local.cache[key]),
        ))
    # A capture/look/clear loop with capture kept on: clear() hands the arrays to
    # get_local's buffer pool and the next forward copies into them. Its first
    # forward (untimed, in begin) fills the pool: the other variants switch
    # capture off after their forward, which empties it.
    for name, policy in [
        ("get_local, default, after a clear() (pooled buffers)", {}),
        ("get_local, keep_on_device=True, after a clear() (pooled)", {"keep_on_device": True}),
    ]:
        begin = using(Decorated, lambda policy=policy: get_local.activate(**policy))
        slots.append(Slot(name, body, after_a_cleared_forward(begin, body, get_local.clear),
                          get_local_off, maps=lambda _: list(get_local.cache[key])))
    slots.append(Slot("original technique + .copy()", body, using(Original),
                      lambda: original_store["Attention.forward"].clear(),
                      maps=lambda _: list(original_store["Attention.forward"])))

    def recorded_maps(_):
        return [m for ms in recorder["on"].maps.values() for m in ms]

    slots.append(Slot("capture_attention(model)", body, using(Attention, start_recorder),
                      stop_recorder, maps=recorded_maps))
    slots.append(Slot("capture_attention(model), after maps.clear() (pooled)", body,
                      after_a_cleared_forward(using(Attention, start_recorder), body,
                                              lambda: recorder["on"].maps.clear()),
                      stop_recorder, maps=recorded_maps))
    if torchlens is not None:
        slot = torchlens_slot(torchlens, model, images, no_grad)
        slot.begin = using(Attention)
        slots.append(slot)

    # Warm-up: one forward of each variant, checking what each stores against
    # get_local's keep_on_device maps (taken first: the reference, and the
    # source of the copy bound). One variant's maps are alive at a time.
    reference_name = "get_local, keep_on_device=True"
    expected = (batch, 6, tokens, tokens)
    _, reference = run_slot(next(s for s in slots if s.name == reference_name), clocks, list)
    stored, checks = {}, []
    for slot in slots:

        def check(maps, name=slot.name):
            shapes = {tuple(m.shape) for m in maps}
            deviation = max(
                float(np.abs(as_numpy(m) - as_numpy(r)).max()) for m, r in zip(maps, reference)
            )
            ok = len(maps) == 12 and shapes == {expected}
            checks.append(f"{name}: {len(maps)} × {sorted(shapes)}, max |Δ| {deviation:.1e}"
                          + ("" if ok else " — UNEXPECTED"))
            return sum(nbytes(m) for m in maps)

        _, stored[slot.name] = run_slot(slot, clocks, check)

    # The copy bound: the same bytes, into warm buffers and into fresh ones.
    # Fresh buffers from torch's allocator (where get_local's and
    # capture_attention's copies go) and from numpy's (where the original
    # technique's `.copy()` goes): numpy asks for transparent huge pages
    # (madvise) for large arrays, torch does not, and on a machine whose THP
    # defrag setting is 'madvise' that can make page faults much dearer.
    sources = [m.contiguous().numpy() for m in reference]
    buffers = [np.empty_like(s) for s in sources]
    for buffer, source in zip(buffers, sources):
        np.copyto(buffer, source)

    def copy_warm():
        for buffer, source in zip(buffers, sources):
            np.copyto(buffer, source)

    def copy_fresh(allocate):
        def body():
            fresh = []
            for source in sources:
                buffer = allocate(source)
                np.copyto(buffer, source)
                fresh.append(buffer)
            return fresh
        return body

    def torch_buffer(source):
        return torch.empty(source.shape, dtype=torch.from_numpy(source[:0]).dtype).numpy()

    def numpy_buffer(source):
        return np.empty(source.shape, source.dtype)

    warm_name = "copy bound: np.copyto into warm buffers"
    fresh_name = "np.copyto into fresh torch buffers"
    slots.append(Slot(warm_name, copy_warm, forward=False))
    slots.append(Slot(fresh_name, copy_fresh(torch_buffer), forward=False))
    slots.append(Slot("np.copyto into fresh numpy buffers", copy_fresh(numpy_buffer),
                      forward=False))
    for slot in slots[-3:]:
        run_slot(slot, clocks)
    map_bytes = sum(s.nbytes for s in sources)

    log(f"    {label}: {len(slots)} variants × {args.rounds} rounds")
    times = measure(slots, args.rounds, clocks, label)

    main, other = args.clock, ("wall" if args.clock == "cpu" else "cpu")
    plain = times["plain forward (capture off)"][main]
    warm = times[warm_name][main]
    report.append(
        f"### {label}: {tokens} tokens; maps {map_bytes / 2**20:.1f} MiB per forward "
        f"(12 × {batch} × 6 × {tokens}² float32)\n"
    )
    fresh = times[fresh_name][main]
    report.append(
        f"| variant | {main} ms | ratio to plain | (variant − plain) ÷ warm copy "
        f"| (variant − plain) ÷ fresh copy | {other} ms | MiB stored |"
    )
    report.append("|---|---:|---:|---:|---:|---:|---:|")
    for slot in slots:
        values = times[slot.name][main]
        if slot.forward and slot.name != "plain forward (capture off)":
            ratio = cell(paired_ratios(values, plain), 2)
            over_warm, over_fresh = (
                cell([(v - p) / c for v, p, c in zip(values, plain, copy)], 2)
                for copy in (warm, fresh)
            )
        elif slot.forward:
            ratio, over_warm, over_fresh = "1", "—", "—"
        else:  # a copy: its share of the plain forward; its time ÷ the warm and fresh copies
            ratio = cell(paired_ratios(values, plain), 3)
            over_warm, over_fresh = (
                "1" if copy is values else "*" + cell(paired_ratios(values, copy), 2) + "*"
                for copy in (warm, fresh)
            )
        kept = stored.get(slot.name)
        report.append(
            f"| {slot.name} | {cell(values, 1)} | {ratio} | {over_warm} | {over_fresh} | "
            f"{quartiles(times[slot.name][other])[1]:.1f} | "
            f"{'' if kept is None else f'{kept / 2**20:.1f}'} |"
        )
    report.append("")
    report.append("Warm-up check (maps per forward, shapes, max |Δ| from get_local's): "
                  + "; ".join(checks) + ".\n")


def fused_section(args, report, clocks):
    import torch

    from visualizer import capture_attention, get_local, sdpa_capture

    log("(c) fused forward, CLS row and full maps")
    _, VisionTransformer = vit_classes()
    Fused = attention_variant(
        "Attention", copy_function(fused_attention_forward, "Attention.forward")
    )
    label, size, patch, batch = (
        ("224 px, ViT-S/14, batch 1", 224, 14, 1) if args.quick
        else ("518 px, ViT-S/14, batch 1", 518, 14, 1)
    )
    tokens = (size // patch) ** 2 + 1
    torch.manual_seed(0)
    model = VisionTransformer(size, patch).eval()
    use_attention(model, Fused)
    images = torch.randn(batch, 3, size, size)

    def body():
        with torch.no_grad():
            return model(images)

    context = {}

    def enter(manager):
        def begin():
            context["manager"] = manager()
            context["maps"] = context["manager"].__enter__()
        return begin

    def leave():
        context.pop("manager").__exit__(None, None, None)
        context.pop("maps")

    def all_maps(_):
        return [m for ms in context["maps"].values() for m in ms]

    # The same weights with the explicit softmax path: what computing every
    # map costs the model itself (a floor for capturing full maps).
    torch.manual_seed(0)
    eager = VisionTransformer(size, patch).eval()

    def eager_body():
        with torch.no_grad():
            return eager(images)

    cls_rows = ["sdpa_capture.capture(rows=0)", "capture_attention(model, rows=0)"]
    slots = [
        Slot("plain fused forward", body),
        Slot(cls_rows[0], body,
             enter(lambda: sdpa_capture.capture(rows=0)), leave, maps=all_maps),
        Slot(cls_rows[1], body,
             enter(lambda: capture_attention(model, rows=0)), leave, maps=all_maps),
        Slot("plain eager forward (explicit softmax, same weights)", eager_body),
        Slot("sdpa_capture.capture(), full maps", body,
             enter(sdpa_capture.capture), leave, maps=all_maps),
        Slot("capture_attention(model), full maps", body,
             enter(lambda: capture_attention(model)), leave, maps=all_maps),
        Slot("sdpa_capture.capture(), full maps, after a clear() (pooled)", body,
             after_a_cleared_forward(enter(sdpa_capture.capture), body, get_local.clear),
             leave, maps=all_maps),
        Slot("capture_attention(model), full maps, after maps.clear() (pooled)", body,
             after_a_cleared_forward(enter(lambda: capture_attention(model)), body,
                                     lambda: context["maps"].clear()),
             leave, maps=all_maps),
    ]
    checks = []

    def check(maps):
        shapes = sorted({tuple(m.shape) for m in maps})
        return f"{len(maps)} × {shapes}, {sum(nbytes(m) for m in maps) / 1024:.1f} KiB"

    for slot in slots:
        _, looked = run_slot(slot, clocks, check)
        if looked is not None:
            checks.append(f"{slot.name}: {looked}")
    log(f"    {label}: {len(slots)} variants × {args.rounds} rounds")
    times = measure(slots, args.rounds, clocks, label)
    main, other = args.clock, ("wall" if args.clock == "cpu" else "cpu")
    plain = times["plain fused forward"][main]
    report.append("## (c) Fused attention: CLS row, and full maps, of every layer\n")
    report.append(
        f"{label}, {tokens} tokens, F.scaled_dot_product_attention, torch.no_grad(); "
        f"{args.clock} ms per forward, {args.rounds} interleaved rounds: median (interquartile "
        "range); ratio to the plain fused forward of the same round. Goal for the CLS row: "
        "≤ 1.05×. Full maps must be computed (the fused kernel never forms them): the eager "
        "forward of the same weights shows what that costs the model itself. Capture is "
        "switched on before and off after each forward, outside the timed region.\n"
    )
    report.append(f"| variant | {main} ms | ratio to plain fused | {other} ms |")
    report.append("|---|---:|---:|---:|")
    for slot in slots:
        values = times[slot.name][main]
        ratio = cell(paired_ratios(values, plain), 3)
        report.append(f"| {slot.name} | {cell(values, 1)} | {ratio} | "
                      f"{quartiles(times[slot.name][other])[1]:.1f} |")
    report.append("")
    for name in cls_rows:
        low, median, high = quartiles(paired_ratios(times[name][main], plain))
        verdict = "meets" if median <= 1.05 else "misses"
        report.append(
            f"- {name}: ×{median:.3f} at the median ({verdict} the 1.05× goal), "
            f"interquartile range {low:.3f}–{high:.3f}"
        )
    eager_times = times["plain eager forward (explicit softmax, same weights)"][main]
    for slot in slots[-2:]:
        report.append(
            f"- {slot.name}: {cell(paired_ratios(times[slot.name][main], eager_times), 2)} "
            "the eager forward"
        )
    report.append("")
    report.append("Warm-up check: " + "; ".join(checks) + ".\n")
    get_local.clear()


# =============================================================================
# main
# =============================================================================


def parse_arguments():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds of whole forwards "
                        "(default 30; --quick: 2)")
    parser.add_argument("--recorder-rounds", type=int,
                        help="rounds of section (a) (default: 30; --quick: 5)")
    parser.add_argument("--number", type=int,
                        help="calls per timing in section (a) (default 50000; --quick: 10000)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: few rounds, small inputs (figures not to publish)")
    parser.add_argument("--only", nargs="+", metavar="SECTION",
                        help="sections to run: a/recorder, b/forwards, c/fused, d/compile "
                        "(default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="process CPU time or wall time (default cpu)")
    parser.add_argument("--pythons", nargs="+", metavar="PYTHON",
                        help="interpreters for section (a) "
                             "(default: .venvs/core-3.X, else /tmp/venv-3.X)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the report to FILE")
    parser.add_argument("--child-recorder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_recorder:
        return args
    if args.rounds is None:
        args.rounds = 2 if args.quick else 30
    if args.recorder_rounds is None:
        args.recorder_rounds = 5 if args.quick else 30
    if args.number is None:
        args.number = 10_000 if args.quick else 50_000
    if args.rounds < 2 or args.recorder_rounds < 2:
        parser.error("--rounds and --recorder-rounds must be at least 2 (quartiles)")
    sections = []
    for name in args.only or SECTIONS:
        name = SECTIONS.get(name, name)
        if name not in SECTIONS.values():
            parser.error(
                f"unknown section {name!r}; expected a/recorder, b/forwards, c/fused, d/compile"
            )
        if name not in sections:
            sections.append(name)
    args.sections = sections
    return args


def main():
    args = parse_arguments()
    if args.child_recorder:
        print(json.dumps(recorder_child(json.loads(args.child_recorder))))
        return
    started, cpu_started = time.perf_counter(), time.process_time()
    start_digest = source_digest()
    os.environ.pop("VISUALIZER_CAPTURE", None)
    torch = None
    if {"forwards", "fused", "compile"} & set(args.sections):
        import torch

        # All of the library this process measures, imported now: one state
        # of its sources for the whole run, whatever is edited meanwhile.
        import visualizer.attention  # noqa: F401
        import visualizer.fused  # noqa: F401

        torch.set_num_threads(args.threads)
    clocks = {"cpu": CLOCKS["cpu"], "wall": CLOCKS["wall"]}
    report = ["# Benchmarks (`python benchmarks/run_all.py"
              + (" --quick" if args.quick else "") + "`)\n"]
    if args.quick:
        report.append("**Quick smoke run: few rounds and small inputs; not figures to quote.**\n")
    report.extend(machine_lines(torch))
    clock = "process CPU time, user + system" if args.clock == "cpu" else "wall time"
    report.append(
        f"- clock: {args.clock} ({clock}); rounds: {args.rounds} for whole forwards, "
        f"{args.recorder_rounds} for (a)"
    )
    report.append("")
    with warnings.catch_warnings():
        # The notices capture gives once (bounds, empty recorders): expected here.
        warnings.simplefilter("ignore", RuntimeWarning)
        for section in args.sections:
            if section == "recorder":
                recorder_section(args, report)
            elif section == "forwards":
                forwards_section(args, report, clocks)
            elif section == "compile":
                from bench_compile import compile_section, get_local_section

                compile_section(args, report, clocks)
                get_local_section(args, report, clocks)
            else:
                fused_section(args, report, clocks)
    digest = source_digest()
    report.append(
        f"Sources (visualizer/*.py) sha256 at the end: {digest}"
        + (" — edited during the run: sections may have measured different code."
           if digest != start_digest else ", unchanged during the run.")
        + "\n"
    )
    report.append(
        f"Total time of this run: {time.perf_counter() - started:.0f} s wall, "
        f"{time.process_time() - cpu_started:.0f} s CPU time of this process (the "
        f"subprocesses of (a) not counted); load average (1, 5, 15 min) at the end: "
        f"{load_average()} (other processes on the machine count in it); peak resident "
        f"memory: {peak_rss_mib():.0f} MiB."
    )
    text = "\n".join(report) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
        log(f"report written to {args.markdown}")


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks: summary statistics, machine description, a ViT-S.

Importing this module does not import torch: `vit_classes()` does, on first use,
so the parts of the benchmarks that run on Pythons without torch can use the
statistics and the machine description.
"""
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# -- statistics ------------------------------------------------------------------


def quartiles(values):
    """(first quartile, median, third quartile) of `values` (inclusive method)."""
    values = list(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def spread(values, digits=2, unit=""):
    """'median (Q1–Q3)', e.g. '41.2 (40.1–43.0)'."""
    low, median, high = quartiles(values)
    return f"{median:.{digits}f}{unit} ({low:.{digits}f}–{high:.{digits}f})"


def paired_ratios(values, baselines):
    """Per-round ratios value / baseline of two series measured in the same rounds."""
    return [value / base for value, base in zip(values, baselines)]


def fixed(number, digits):
    return f"{number:.{digits}f}"


# -- the machine -----------------------------------------------------------------


def cpu_model():
    """'AMD EPYC (family 25, model 17)' from /proc/cpuinfo, else what platform says."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def load_average():
    """'1.23, 0.98, 0.50' (1, 5, 15 minutes), or 'unknown'."""
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def git_revision():
    """The commit measured, and whether visualizer/ differs from it (read-only git calls).

    GIT_OPTIONAL_LOCKS=0: `git status` then never refreshes the index on disk,
    so a run leaves the repository exactly as it found it, even while others
    use git in it.
    """
    environment = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*arguments):
        done = subprocess.run(
            ["git", "-C", str(REPO), *arguments],
            capture_output=True, text=True, timeout=10, env=environment,
        )
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        commit = git("rev-parse", "--short=10", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no", "--", "visualizer")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit is None:
        return "unknown"
    return commit + (" + uncommitted changes in visualizer/" if changes else "")


def hugepage_settings():
    """The kernel's THP settings (the [selected] words) and numpy's madvise choice."""
    parts = []
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as setting:
                words = setting.read().split()
            chosen = [w.strip("[]") for w in words if w.startswith("[")]
            parts.append(f"{name} '{chosen[0] if chosen else ' '.join(words)}'")
        except OSError:
            parts.append(f"{name} unknown")
    try:
        import numpy

        core = getattr(numpy, "_core", None) or numpy.core
        madvise = core.multiarray._get_madvise_hugepage()
        parts.append(f"numpy madvises huge pages: {'yes' if madvise else 'no'}")
    except (AttributeError, ImportError):
        pass
    return ", ".join(parts)


def source_digest():
    """A short hash of the library's sources (visualizer/*.py) as they are on disk now.

    `git describe --dirty` cannot tell two states of an edited working tree apart;
    this can, so a run can say whether the code changed while it ran.
    """
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((REPO / "visualizer").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def affinity_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def machine_lines(torch=None):
    """Markdown bullet lines describing the machine and software."""
    import numpy

    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores "
        f"({affinity_cores()} usable by this process), {platform.machine()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()} ({sys.implementation.name}), "
        f"numpy {numpy.__version__}",
    ]
    if torch is not None:
        lines.append(
            f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
            f"{torch.get_num_interop_threads()} inter-op threads"
        )
    lines.append(f"- transparent huge pages: {hugepage_settings()}")
    lines.append(
        f"- visualizer from {REPO} at {git_revision()}, sources (visualizer/*.py) "
        f"sha256 {source_digest()} when the run started"
    )
    lines.append(f"- load average (1, 5, 15 min) at the start: {load_average()}")
    return lines


def peak_rss_mib():
    """Peak resident set of this process so far, MiB (Linux: ru_maxrss is in KiB)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return float("nan")


# -- a timm-style ViT-S ----------------------------------------------------------

_CLASSES = {}


def attention_forward(self, x):
    """timm's Attention.forward, explicit path: the map is the local `attn`."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
    x = attn @ v
    x = x.transpose(1, 2).reshape(B, N, C)
    return self.proj(x)


def fused_attention_forward(self, x):
    """timm's Attention.forward with fused_attn: F.scaled_dot_product_attention."""
    import torch.nn.functional as F

    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    x = x.transpose(1, 2).reshape(B, N, C)
    return self.proj(x)


def copy_function(source, qualname=None):
    """A new function object with `source`'s code (so decorating it leaves `source` alone).

    `qualname` ("Attention.forward") also sets the name, its last part.
    """
    name = qualname.rsplit(".", 1)[-1] if qualname else source.__name__
    copied = type(source)(
        source.__code__, source.__globals__, name, source.__defaults__, source.__closure__
    )
    copied.__qualname__ = qualname or source.__qualname__
    return copied


def vit_classes():
    """(Attention, VisionTransformer): timm-like, built on first use (imports torch)."""
    if _CLASSES:
        return _CLASSES["Attention"], _CLASSES["VisionTransformer"]
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads = num_heads
            self.scale = (dim // num_heads) ** -0.5
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)

        forward = copy_function(attention_forward, "Attention.forward")

    class Mlp(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, dim, num_heads, mlp_ratio):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, num_heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class VisionTransformer(nn.Module):
        """Patch embedding, CLS token, learned positions, blocks, norm, head on CLS."""

        def __init__(self, img_size, patch_size, dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                     num_classes=1000):
            super().__init__()
            self.grid = img_size // patch_size
            self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2 + 1, dim) * 0.02)
            self.blocks = nn.Sequential(
                *[Block(dim, num_heads, mlp_ratio) for _ in range(depth)]
            )
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, num_classes)

        def forward(self, images):
            x = self.patch_embed(images).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = self.blocks(x + self.pos_embed)
            return self.head(self.norm(x)[:, 0])

    _CLASSES.update(Attention=Attention, VisionTransformer=VisionTransformer)
    return Attention, VisionTransformer


def attention_variant(name, forward):
    """A subclass of the benchmark's Attention whose forward is `forward`."""
    Attention, _ = vit_classes()
    return type(name, (Attention,), {"forward": forward, "__qualname__": name})


def use_attention(model, cls):
    """Switch every attention module of `model` to the class `cls` (same parameters)."""
    for block in model.blocks:
        block.attn.__class__ = cls


def original_technique(varname, store, copy=None):
    """The original Visualizer's get_local, re-implemented from its description.

    The decorator puts `(result, value)` in place of the result, before the last
    instruction (the return), with the `bytecode` package; the wrapper unpacks
    the tuple and appends the value (`copy(value)` if given) to
    `store[qualname]`.
    """
    from bytecode import Bytecode, Instr

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
        qualname = func.__qualname__
        store.setdefault(qualname, [])

        if copy is None:
            def wrapper(*args, **kwargs):
                result, value = func(*args, **kwargs)
                store[qualname].append(value)
                return result
        else:
            def wrapper(*args, **kwargs):
                result, value = func(*args, **kwargs)
                store[qualname].append(copy(value))
                return result

        wrapper.__qualname__ = qualname
        return wrapper

    return decorator

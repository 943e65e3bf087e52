"""Token attention where the right answer is known: a transformer that reverses its input.

    python examples/token_attention.py              # ~5 s on two CPU cores
    python examples/token_attention.py --out figs --steps 400 --seed 1

A one-block transformer, written here with torch.nn, learns to output its
input sequence reversed: output position i must hold input token n-1-i. With
one attention layer, attention is the only path from one position to another,
so the model can only succeed by having query i attend to key n-1-i: the
anti-diagonal of the map. Nothing tells it so; it has to find it.

`visualizer.capture_attention(model)` records the map (the explicit softmax in
`SelfAttention.forward`), and the example prints, per head, the share of each
query's attention that falls on the key the rule names, averaged over queries
and held-out sequences, before and after training, beside 1/n (uniform
attention) and the reversal accuracy. With random weights every head sits at
about 1/n; after training the routing head puts nearly all its attention on
the anti-diagonal. `plot.tokens` (the heatmap) and `plot.head_view` (BertViz's
lines) draw one held-out sequence before and after training, side by side,
into --out (default out/token_attention); explorer.html is the trained
model's attention on it as an interactive page (head view and matrix).
"""
import argparse
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see vit_walkthrough.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from visualizer import analysis, capture_attention, explore, plot  # noqa: E402

LENGTH = 8
SYMBOLS = string.ascii_lowercase[:10]  # the vocabulary, one letter per token id
DPI = 90


class SelfAttention(nn.Module):
    """Multi-head self-attention that writes its softmax out, as timm's explicit path does."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # No causal mask: every output position may read every input position.
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, H, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, length, dim))


class Reverser(nn.Module):
    """Token and position embeddings, one pre-norm block, a linear read-out per position."""

    def __init__(self, vocab=len(SYMBOLS), length=LENGTH, dim=32, num_heads=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        # Small, as in ViT: random-weight attention is then close to uniform,
        # the baseline the trained attention is compared with.
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids) + self.position
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.out(self.norm(x))  # (B, N, vocab)


def sequences(count, generator):
    """``count`` random sequences ``(count, LENGTH)`` of token ids."""
    return torch.randint(len(SYMBOLS), (count, LENGTH), generator=generator)


def train(model, steps, seed, batch_size=128, lr=3e-3):
    """Adam on fresh random sequences each step; the target is the input reversed."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids = sequences(batch_size, generator)
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flip(1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@dataclass
class Measure:
    """Where the attention went, on held-out sequences."""

    on_rule: np.ndarray  # (H,): share of attention on key n-1-i, mean over queries i and items
    entropy: np.ndarray  # (H,): mean entropy of a query's attention, nats
    accuracy: float  # share of output tokens that are the reversed input's

    @property
    def best_head(self):
        return int(self.on_rule.argmax())

    def __str__(self):
        heads = ", ".join(f"head {h} {share:.1%}" for h, share in enumerate(self.on_rule))
        return (
            f"attention on the anti-diagonal: {heads} (mean {self.on_rule.mean():.1%}); "
            f"reversal accuracy {self.accuracy:.1%}"
        )


def measure(model, ids):
    """Capture one forward over ``ids`` and measure its map against the rule."""
    with capture_attention(model) as maps, torch.no_grad():
        logits = model(ids)
    stack = maps.stack()  # (L=1, B, H, N, N): one forward of a one-block model
    attn = stack[0]
    queries = np.arange(LENGTH)
    on_rule = attn[:, :, queries, LENGTH - 1 - queries].mean(axis=(0, 2))  # (H,)
    # num_layers=1: the model's depth, so a stack holding two forwards would be refused.
    entropy = analysis.attention_entropy(stack, num_layers=1)[0]
    accuracy = float((logits.argmax(-1) == ids.flip(1)).float().mean())
    return Measure(on_rule, entropy, accuracy), attn


def draw(maps, ids, index, out):
    """The heatmap and the head view of sequence ``index``, random and trained side by side."""
    labels = [SYMBOLS[token] for token in ids[index].tolist()]
    paths = []

    heatmaps = Figure(figsize=(10, 4.6), layout="constrained")
    for ax, (stage, (attn, result)) in zip(heatmaps.subplots(1, 2), maps.items()):
        plot.tokens(attn, labels, head=result.best_head, batch_index=index, ax=ax)
        ax.set_title(f"{stage}: head {result.best_head}, {result.on_rule.max():.0%} on the rule")
    paths.append(out / "token_attention.png")
    heatmaps.savefig(paths[-1], dpi=DPI)

    # Random weights with every head over each other; trained heads one per
    # panel, since a routing head drawn over another would hide it.
    (random_attn, _), (trained_attn, _) = maps.values()
    num_heads = trained_attn.shape[1]
    views = Figure(figsize=(3.6 * (1 + num_heads), 4.8), layout="constrained")
    axes = views.subplots(1, 1 + num_heads)
    plot.head_view(random_attn, labels, batch_index=index, ax=axes[0])
    axes[0].set_title("random weights: every head")
    for head, ax in enumerate(axes[1:]):
        plot.head_view(trained_attn, labels, heads=head, batch_index=index, ax=ax)
        ax.set_title(f"trained: head {head}")
    paths.append(out / "head_view.png")
    views.savefig(paths[-1], dpi=DPI)
    return paths


def write_explorer(model, ids, index, out):
    """Sequence ``index``'s attention as out/explorer.html, its letters as the tokens."""
    with capture_attention(model) as maps, torch.no_grad():
        model(ids[index : index + 1])
    tokens = [SYMBOLS[token] for token in ids[index].tolist()]
    return explore(maps, tokens=tokens).save(out / "explorer.html")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/token_attention"))
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=512, help="held-out sequences measured")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # A model this small is all overhead for torch's intra-op threads: on a
    # busy two-core machine one thread trains ~10x faster. Restored at the end.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args):
    """Measure, train, measure again and draw; return the measures and figure paths."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = Reverser().eval()
    # Held-out sequences from their own generator: never the training stream's.
    held_out = sequences(args.held_out, torch.Generator().manual_seed(10_000 + args.seed))
    before, random_maps = measure(model, held_out)
    print(f"random weights: {before}")
    train(model, args.steps, args.seed)
    after, trained_maps = measure(model, held_out)
    print(f"after {args.steps} steps: {after}")
    uniform = 1 / LENGTH
    print(
        f"best head: {before.on_rule.max():.1%} -> {after.on_rule.max():.1%} of its attention on "
        f"the anti-diagonal (uniform attention: {uniform:.1%}); entropy of head "
        f"{after.best_head} {before.entropy[after.best_head]:.2f} -> "
        f"{after.entropy[after.best_head]:.2f} nats (uniform: {np.log(LENGTH):.2f})"
    )
    figures = draw(
        {"random weights": (random_maps, before), "trained": (trained_maps, after)},
        held_out,
        0,
        args.out,
    )
    explorer = write_explorer(model, held_out, 0, args.out)
    seconds = time.perf_counter() - started
    print(f"figures and {explorer.name} written to {args.out}/ ({seconds:.1f} s)")
    return {
        "before": before,
        "after": after,
        "uniform": uniform,
        "figures": figures,
        "explorer": explorer,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()

"""DETR-style cross-attention: where each object query looks on the feature map.

    python examples/detr_cross_attention.py            # ~30 s on two CPU cores
    python examples/detr_cross_attention.py --out figs --steps 300 --seed 1

A tiny DETR (conv backbone -> transformer encoder -> decoder with learned
object queries -> class and box heads) learns, in seconds, to find the three
shapes in drawn scenes. The decoder's cross-attention is captured with
`@get_local('attn')` on `CrossAttention.forward`, the one function that
computes it, instead of DETR users' six forward hooks and a re-implementation
of `nn.MultiheadAttention`'s projections.

Matching, kept simple: every scene holds three objects whose centres are
apart horizontally, and object query k is always trained on the k-th object
from the left. DETR instead matches queries to objects with the Hungarian
algorithm and has a "no object" class; the fixed order needs neither and
trains in a few hundred steps.

It prints the share of each query's last-layer cross-attention that falls
inside its object's box, against the share of the image the box covers
(what attention spread evenly would give), before and after training, and
draws each query's attention beside the image with its box; explorer.html is
the same scene as an interactive page (hover an object query to see its map).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see vit_walkthrough.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from examples.shapes_data import MEAN, SHAPES, STD, make_scenes  # noqa: E402
from examples.train import training_setup  # noqa: E402
from visualizer import analysis, capture_attention, explore, get_local, plot  # noqa: E402
from visualizer.analysis import ImageGeometry  # noqa: E402

IMAGE_SIZE = 48
NUM_OBJECTS = 3
STRIDE = 4  # backbone downsampling: a 12x12 feature map
GRID = (IMAGE_SIZE // STRIDE, IMAGE_SIZE // STRIDE)
CROSS_KEY = "CrossAttention.forward"
DPI = 90


class CrossAttention(nn.Module):
    """Object queries attend to the encoder's feature map (DETR's `multihead_attn`)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    @get_local("attn")
    def forward(self, queries, memory, memory_pos):
        """queries ``(B, Q, C)``, memory and its positions ``(B, S, C)``; attn ``(B, H, Q, S)``."""
        B, Q, C = queries.shape
        # As in DETR, positions go into the keys only: where a cell is decides
        # whether it is attended to, what it holds is what is read.
        q = self.split_heads(self.q(queries))
        k = self.split_heads(self.k(memory + memory_pos))
        v = self.split_heads(self.v(memory))
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, Q, C))

    def split_heads(self, x):
        """``(B, L, C)`` -> ``(B, H, L, C / H)``."""
        B, L, C = x.shape
        return x.reshape(B, L, self.num_heads, C // self.num_heads).transpose(1, 2)


class DecoderLayer(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, x, query_pos, memory, memory_pos):
        q = self.norms[0](x) + query_pos
        x = x + self.self_attn(q, q, self.norms[0](x), need_weights=False)[0]
        x = x + self.cross_attn(self.norms[1](x) + query_pos, memory, memory_pos)
        return x + self.mlp(self.norms[2](x))


class TinyDETR(nn.Module):
    """Conv backbone, encoder, decoder with learned object queries, class and box heads."""

    def __init__(self, dim=64, num_heads=4, num_queries=NUM_OBJECTS, depth=2):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )
        # Fixed sine positions, like DETR's: boxes are regressed from where
        # attention lands, so every cell must say where it is from the start.
        self.register_buffer("pos", sine_positions(GRID, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.query_pos = nn.Parameter(torch.randn(1, num_queries, dim))
        self.decoder = nn.ModuleList(DecoderLayer(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.classify = nn.Linear(dim, len(SHAPES))
        self.box = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4))

    def forward(self, images):
        """Class logits ``(B, Q, classes)`` and boxes ``(B, Q, 4)`` as normalized (cx, cy, w, h)."""
        features = self.backbone(images).flatten(2).transpose(1, 2)  # (B, h*w, C), row-major
        memory = self.encoder(features + self.pos)
        pos = self.pos.expand(len(images), -1, -1)
        query_pos = self.query_pos.expand(len(images), -1, -1)
        x = torch.zeros_like(query_pos)
        for layer in self.decoder:
            x = layer(x, query_pos, memory, pos)
        x = self.norm(x)
        return self.classify(x), self.box(x).sigmoid()


def sine_positions(grid, dim):
    """``(1, h*w, dim)`` 2-D sine/cosine encoding of the cells of a row-major grid."""
    frequencies = 1.0 / 100 ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    angles = [axis.flatten()[:, None].float() * frequencies for axis in (rows, cols)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=-1)[None]


def normalized_cxcywh(boxes):
    """Pixel ``(x0, y0, x1, y1)`` -> DETR's normalized ``(cx, cy, w, h)``, as a tensor."""
    boxes = torch.as_tensor(boxes) / IMAGE_SIZE
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)


def train(model, steps, seed, batch_size=32, lr=2e-3, log_every=100):
    """Class cross-entropy plus box L1; query k is matched to the k-th object from the left."""
    rng, optimizer, schedule = training_setup(model, steps, lr, seed)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        scenes = make_scenes(batch_size, rng, image_size=IMAGE_SIZE, num_objects=NUM_OBJECTS)
        logits, boxes = model(scenes.images)
        class_loss = F.cross_entropy(logits.flatten(0, 1), scenes.labels.flatten())
        box_loss = F.l1_loss(boxes, normalized_cxcywh(scenes.boxes))
        loss = class_loss + 10 * box_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(
                f"  step {step:4d}  class loss {class_loss.item():.3f}  "
                f"box L1 {box_loss.item():.3f}  ({time.perf_counter() - started:.0f} s)"
            )
    model.eval()


def measure(model, scenes):
    """Cross-attention inside each query's own box vs the box's area share; also box IoU."""
    with get_local.capture() as cache, torch.no_grad():
        logits, boxes = model(scenes.images)
    cross = cache[CROSS_KEY][-1]  # last decoder layer, (B, H, Q, h*w)
    inside = analysis.attention_mass_in_boxes(cross, scenes.boxes, (IMAGE_SIZE, IMAGE_SIZE), GRID)
    predicted = analysis.box_cxcywh_to_xyxy(boxes, (IMAGE_SIZE, IMAGE_SIZE))
    return {
        "inside": inside.mean(axis=0),  # per query
        "area": (box_area(scenes.boxes) / IMAGE_SIZE**2).mean(axis=0),
        "iou": float(box_iou(predicted, scenes.boxes).mean()),
        "accuracy": float((logits.argmax(-1) == scenes.labels).float().mean()),
        "cross": cross,
    }


def box_area(boxes):
    """Areas of pixel boxes ``(..., 4)`` as ``(x0, y0, x1, y1)``."""
    return np.prod(np.clip(boxes[..., 2:] - boxes[..., :2], 0, None), axis=-1)


def box_iou(a, b):
    """IoU of matching pixel boxes ``(..., 4)``."""
    low, high = np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])
    intersection = box_area(np.concatenate([low, high], axis=-1))
    return intersection / (box_area(a) + box_area(b) - intersection)


def report(name, result):
    queries = ", ".join(
        f"query {q} {inside:.0%} (box {area:.0%})"
        for q, (inside, area) in enumerate(zip(result["inside"], result["area"]))
    )
    print(
        f"{name}: cross-attention inside its box: {queries}; mean {result['inside'].mean():.0%} vs "
        f"area share {result['area'].mean():.0%}; box IoU {result['iou']:.2f}, "
        f"class accuracy {result['accuracy']:.0%}"
    )


def write_explorer(model, scenes, index, out):
    """Scene ``index`` as out/explorer.html: encoder self-, decoder self- and cross-attention."""
    with capture_attention(model) as maps, torch.no_grad():
        model(scenes.images[index : index + 1])
    # The keys of cross-attention are the feature-map cells: no prefix tokens.
    geometry = ImageGeometry(grid_size=GRID, num_prefix_tokens=0, mean=MEAN, std=STD)
    labels = [f"query {k} (object {k + 1} from the left)" for k in range(NUM_OBJECTS)]
    page = explore(
        maps,
        image=scenes.images[index],
        geometry=geometry,
        query_tokens=labels,
        boxes=scenes.boxes[index],
    )
    return page.save(out / "explorer.html")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/detr_cross_attention"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", type=int, default=0, help="index of the held-out scene to draw")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = TinyDETR().eval()
    scenes = make_scenes(128, np.random.default_rng(1234), image_size=IMAGE_SIZE)  # held out
    before = measure(model, scenes)
    report("random weights", before)
    print(f"training for {args.steps} steps")
    train(model, args.steps, args.seed)
    after = measure(model, scenes)
    report("trained", after)

    path = args.out / "cross_attention.png"
    index = args.image
    fig = plot.cross_attention(
        after["cross"][index : index + 1],
        list(range(NUM_OBJECTS)),
        scenes.images[index],
        grid_size=GRID,
        boxes=scenes.boxes[index],
        mean=MEAN,
        std=STD,
    )
    fig.savefig(path, dpi=DPI)
    explorer = write_explorer(model, scenes, index, args.out)
    print(f"figure written to {path}, the interactive page to {explorer}")
    return {"before": before, "after": after, "figures": [path], "explorer": explorer}


if __name__ == "__main__":
    main()

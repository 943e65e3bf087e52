"""Train the example ViT on drawn shapes, and measure where its CLS token looks.

Shared by the ViT walkthrough, mean attention distance, attention rollout, the
demo notebook and the tests, so all of them train and measure the same way:

    model = build_vit(seed=0)
    object_attention_share(model, batch)     # ~ the uniform share: random weights
    train_vit(model, steps=300, seed=0)      # ~15 s on two CPU cores
    object_attention_share(model, batch)     # about 3x the uniform share

`Attention.forward` keeps its `@get_local('attn')` while training; capture is
off, so the decorated function runs its original code at no cost.
"""
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from examples.shapes_data import SHAPES, make_shapes, patch_coverage
from examples.toy_vit import VisionTransformer
from visualizer import analysis, get_local

IMAGE_SIZE = 32
PATCH_SIZE = 4
ATTENTION_KEY = "Attention.forward"  # get_local's cache key: the decorated function's __qualname__

# Patches at least this much covered by the object count as "object patches".
OBJECT_COVERAGE = 0.25


def build_vit(seed=0):
    """A 3-block ViT for 32x32 images, 4x4 patches (an 8x8 grid), three shape classes.

    Three blocks, not ViT-B's twelve: it trains in seconds, and across seeds
    its last layer's CLS attention reliably lands on the object (with four
    blocks, some seeds do the looking in an earlier layer).
    """
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=(IMAGE_SIZE, IMAGE_SIZE),
        patch_size=PATCH_SIZE,
        num_classes=len(SHAPES),
        dim=64,
        depth=3,
        num_heads=4,
    )


def training_setup(model, steps, lr, seed):
    """What every training loop here starts with: a seeded generator for the
    drawn batches, AdamW and a one-cycle schedule, and the model in train mode."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    model.train()
    return rng, optimizer, schedule


def train_vit(model, steps, seed=0, batch_size=64, lr=2e-3, log_every=50):
    """Train on fresh batches of drawn shapes; return the accuracy over the last logged steps.

    A new batch per step (never a fixed training set) lets a few hundred steps
    generalise: the model never sees an image twice. One-cycle AdamW (warm up,
    then anneal to zero) ends each call at a settled model, so what is
    visualized after it is not a snapshot of a noisy step.
    """
    if get_local.is_active:
        # The decorator may stay in place, but capture must be off: on, every
        # training step would store each block's (B, H, N, N) map.
        raise RuntimeError(
            "train_vit: get_local capture is on, so training would keep every step's "
            "attention maps; call get_local.deactivate() first"
        )
    rng, optimizer, schedule = training_setup(model, steps, lr, seed)
    correct, seen, started = 0, 0, time.perf_counter()
    for step in range(1, steps + 1):
        batch = make_shapes(batch_size, rng, image_size=IMAGE_SIZE)
        logits = model(batch.images)
        loss = F.cross_entropy(logits, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        correct += (logits.argmax(-1) == batch.labels).sum().item()
        seen += batch_size
        if step % log_every == 0 or step == steps:
            print(
                f"  step {step:4d}  loss {loss.item():.3f}  "
                f"training accuracy {correct / seen:.0%}  ({time.perf_counter() - started:.0f} s)"
            )
            accuracy, correct, seen = correct / seen, 0, 0
    model.eval()
    return accuracy


@dataclass
class ObjectShare:
    """Where the last layer's CLS query puts its attention, over a batch.

    Attributes:
        on_object: mean share of CLS attention to patches (CLS column left
            out, so heads that park weight on CLS itself are not penalised)
            that falls on object patches, averaged over heads and images.
        uniform: the share uniform attention would give: object patches / all patches.
        best_head: ``on_object`` of the head that looks at the object most.
        accuracy: classification accuracy on the batch.
    """

    on_object: float
    uniform: float
    best_head: float
    accuracy: float

    def __str__(self):
        return (
            f"last-layer CLS attention on the object: {self.on_object:.1%} "
            f"(best head {self.best_head:.1%}) vs uniform share {self.uniform:.1%} "
            f"= {self.on_object / self.uniform:.1f}x; accuracy {self.accuracy:.0%}"
        )


def object_share(last_map, logits, batch, grid_size, num_prefix_tokens=1):
    """:class:`ObjectShare` from a last-layer map ``(B, H, N, N)`` (or its CLS row) and logits."""
    cls = analysis.cls_attention(last_map, grid_size, num_prefix_tokens)  # (B, H, h, w)
    cls = cls / cls.sum(axis=(-2, -1), keepdims=True)
    on_object = patch_coverage(batch.masks, PATCH_SIZE) >= OBJECT_COVERAGE  # (B, h, w)
    per_head = (cls * on_object[:, None]).sum(axis=(-2, -1))  # (B, H)
    return ObjectShare(
        on_object=float(per_head.mean()),
        uniform=float(on_object.mean()),
        best_head=float(per_head.mean(axis=0).max()),
        accuracy=float((logits.argmax(-1) == batch.labels).float().mean()),
    )


def object_attention_share(model, batch):
    """Measure :class:`ObjectShare` of the example ViT on a :class:`Shapes` batch."""
    model.eval()
    with get_local.capture() as cache, torch.no_grad():
        logits = model(batch.images)
    last = cache[ATTENTION_KEY][-1]  # one (B, H, N, N) entry per block, in order
    return object_share(last, logits, batch, model.grid_size, model.num_prefix_tokens)


def evaluation_batch(count=256, seed=1234):
    """A fixed held-out batch (its own seed: never one of the training batches)."""
    return make_shapes(count, np.random.default_rng(seed), image_size=IMAGE_SIZE)


def add_vit_arguments(parser):
    """The options of the examples that need the trained ViT: a checkpoint, or how to train."""
    parser.add_argument("--checkpoint", help="vit.pt written by vit_walkthrough.py; else train")
    parser.add_argument("--steps", type=int, default=300, help="training steps if no checkpoint")
    parser.add_argument("--seed", type=int, default=0)


def load_or_train(checkpoint=None, steps=300, seed=0):
    """The trained ViT: from a walkthrough's ``state_dict`` file if given, else trained now."""
    model = build_vit(seed)
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        print(f"loaded {checkpoint}")
    else:
        print(f"training the ViT for {steps} steps (no --checkpoint given)")
        train_vit(model, steps, seed=seed)
    return model.eval()

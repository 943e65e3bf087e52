"""Procedurally drawn images whose ground truth says where the object is.

Pretrained weights cannot be downloaded here, and attention maps of random
weights are noise. So the examples train small models, in seconds, on images
drawn here: a filled shape (circle, square or triangle) on a noisy background
covered with clutter (lines and dots of random colours). Colour does not give
the class away (clutter and objects draw from the same colours), so a
classifier has to find the shape; and because every image comes with the
object's pixel mask and box, an example can measure how much attention falls
on the object instead of only showing it.

    rng = np.random.default_rng(0)
    batch = make_shapes(64, rng)        # images (64, 3, 32, 32), labels, masks, boxes
    scenes = make_scenes(64, rng)       # three objects per image, sorted left to right

Images come normalized with MEAN and STD, as a torchvision `Normalize` would
leave them (zero-centred inputs train faster); plots take `mean=MEAN, std=STD`
to show them as drawn. Everything is drawn with numpy from the generator passed
in, so a seed fixes the data exactly.
"""
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


@dataclass
class Shapes:
    """One object per image.

    Attributes:
        images: ``(B, 3, H, W)`` float32, normalized with MEAN and STD: the
            tensor the model sees.
        labels: ``(B,)`` int64 index into :data:`SHAPES`.
        masks: ``(B, H, W)`` bool, True on the object's pixels.
        boxes: ``(B, 4)`` float32 pixel ``(x0, y0, x1, y1)`` around the object.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: np.ndarray
    boxes: np.ndarray


@dataclass
class Scenes:
    """Several objects per image, ordered by the x of their centre (left to right).

    Attributes:
        images: ``(B, 3, H, W)`` float32, normalized with MEAN and STD.
        labels: ``(B, K)`` int64 index into :data:`SHAPES`.
        boxes: ``(B, K, 4)`` float32 pixel ``(x0, y0, x1, y1)``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    boxes: np.ndarray


def shape_mask(kind, centre_x, centre_y, radius, size):
    """Boolean ``(size, size)`` mask of a filled shape of the given half-width."""
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    dx, dy = x - centre_x, y - centre_y
    if kind == "circle":
        return dx**2 + dy**2 <= radius**2
    if kind == "square":
        # A little smaller than the circle's bounding box, so the two cover
        # similar areas.
        half = 0.85 * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if kind == "triangle":
        # Pointing up: apex at the top, base at the bottom; inside when below
        # both slanted edges.
        return (dy <= 0.8 * radius) & (2 * np.abs(dx) <= (dy + radius) * 1.1)
    raise ValueError(f"shape must be one of {SHAPES}; got {kind!r}")


def _background(rng, size):
    """Noisy dark background with clutter: thin lines and dots of random colours."""
    base = rng.uniform(0.0, 0.35, size=3)
    image = np.clip(base + rng.normal(0, 0.06, size=(size, size, 3)), 0, 1)
    for _ in range(rng.integers(4, 8)):
        start, end = rng.uniform(0, size, size=(2, 2))
        steps = np.linspace(0, 1, 2 * size)[:, None]
        points = np.clip((start + steps * (end - start)).astype(int), 0, size - 1)
        image[points[:, 1], points[:, 0]] = _colour(rng)
    for _ in range(rng.integers(6, 12)):
        x, y = rng.integers(0, size - 1, size=2)
        image[y : y + 2, x : x + 2] = _colour(rng)
    return image


def _colour(rng):
    """A bright colour: objects and clutter share this palette."""
    colour = rng.uniform(0.2, 1.0, size=3)
    colour[rng.integers(3)] = 1.0
    return colour


def _box(mask):
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)


def make_shapes(count, rng, image_size=32, radius_range=(5.0, 8.0)):
    """``count`` images with one shape each on clutter; see :class:`Shapes`."""
    images = np.empty((count, image_size, image_size, 3))
    labels = rng.integers(len(SHAPES), size=count)
    masks = np.empty((count, image_size, image_size), dtype=bool)
    for index in range(count):
        radius = rng.uniform(*radius_range)
        centre_x, centre_y = rng.uniform(radius + 1, image_size - radius - 1, size=2)
        masks[index] = shape_mask(SHAPES[labels[index]], centre_x, centre_y, radius, image_size)
        images[index] = _background(rng, image_size)
        images[index][masks[index]] = _colour(rng)
    return Shapes(
        images=_to_tensor(images),
        labels=torch.from_numpy(labels).long(),
        masks=masks,
        boxes=np.stack([_box(mask) for mask in masks]),
    )


def make_scenes(count, rng, image_size=48, num_objects=3, radius_range=(5.0, 7.0), min_gap_x=6.0):
    """``count`` images with ``num_objects`` shapes each, sorted left to right; see :class:`Scenes`.

    Objects do not overlap, and their centres are at least ``min_gap_x``
    pixels apart horizontally, so "the k-th object from the left" is never
    ambiguous: the detection example assigns object query k to it.
    """
    images = np.empty((count, image_size, image_size, 3))
    labels = rng.integers(len(SHAPES), size=(count, num_objects))
    boxes = np.empty((count, num_objects, 4), dtype=np.float32)
    for index in range(count):
        placed = _place(rng, image_size, num_objects, radius_range, min_gap_x)
        images[index] = _background(rng, image_size)
        for slot, (centre_x, centre_y, radius) in enumerate(placed):
            mask = shape_mask(SHAPES[labels[index, slot]], centre_x, centre_y, radius, image_size)
            images[index][mask] = _colour(rng)
            boxes[index, slot] = _box(mask)
    return Scenes(images=_to_tensor(images), labels=torch.from_numpy(labels).long(), boxes=boxes)


def _place(rng, image_size, num_objects, radius_range, min_gap_x):
    """Centres and radii of non-overlapping objects, sorted by centre x (rejection sampling)."""
    while True:
        radii = rng.uniform(*radius_range, size=num_objects)
        centres = rng.uniform(
            radii[:, None] + 1, image_size - radii[:, None] - 1, size=(num_objects, 2)
        )
        order = np.argsort(centres[:, 0])
        centres, radii = centres[order], radii[order]
        apart = np.all(np.diff(centres[:, 0]) >= min_gap_x)
        gaps = np.abs(centres[:, None] - centres[None]).max(axis=-1)  # Chebyshev distance
        reach = radii[:, None] + radii[None] + 1
        if apart and np.all((gaps >= reach) | np.eye(num_objects, dtype=bool)):
            return [(x, y, r) for (x, y), r in zip(centres, radii)]


def _to_tensor(images):
    """``(B, H, W, 3)`` in ``[0, 1]`` -> normalized ``(B, 3, H, W)`` float32, what models take."""
    normalized = (images - np.asarray(MEAN)) / np.asarray(STD)
    return torch.from_numpy(normalized.transpose(0, 3, 1, 2).astype(np.float32))


def patch_coverage(masks, patch_size):
    """Share of each patch covered by the object: ``(B, H, W)`` masks -> ``(B, h, w)``."""
    batch, height, width = masks.shape
    blocks = masks.reshape(batch, height // patch_size, patch_size, width // patch_size, patch_size)
    return blocks.mean(axis=(2, 4))

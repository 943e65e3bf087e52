"""Write demo.ipynb from the cells below, execute it, and save it with its outputs.

    python examples/make_notebook.py        # ~40 s; run from anywhere

The notebook is generated rather than edited by hand so its code stays
reviewable here; it is committed executed, so it renders where it is browsed,
and tests/test_notebook.py executes it again top to bottom, so it cannot rot.
"""
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "demo.ipynb"

CELLS = [
    (
        "markdown",
        """# Visualizer demo: attention maps of a ViT, captured with `get_local`

The original Visualizer walkthrough, on the small ViT of `examples/toy_vit.py`,
whose `Attention.forward` carries `@get_local('attn')`. Pretrained weights are
not needed: the model learns in seconds to tell circles, squares and triangles
apart on cluttered backgrounds (`examples/shapes_data.py`), so its maps show
something real. Run it from the repository root.""",
    ),
    (
        "code",
        """%matplotlib inline
import torch

from visualizer import get_local

get_local.activate()  # as in the original: switch capture on, then import the model
from examples.toy_vit import VisionTransformer  # Attention.forward has @get_local('attn')
from examples.shapes_data import MEAN, SHAPES, STD
from examples.train import build_vit, evaluation_batch, object_attention_share, train_vit""",
    ),
    (
        "markdown",
        """## Train with the decorator in place

Attention of random weights is noise, so train first. The decorator stays
on `Attention.forward`; capture is switched off, so it costs nothing and no
step's maps are kept (`train_vit` refuses to run with capture on: that is the
out-of-memory mistake the original's global-list workaround invited).""",
    ),
    (
        "code",
        """get_local.deactivate()
model = build_vit(seed=0)  # VisionTransformer(img_size=(32, 32), patch_size=4, depth=3, ...)
batch = evaluation_batch()  # held-out images with their object masks
print("random weights:", object_attention_share(model, batch))
train_vit(model, steps=300)
print("trained:", object_attention_share(model, batch))""",
    ),
    (
        "markdown",
        """## Forward, then read `get_local.cache`

One forward pass with capture on fills the cache: a dict keyed by the
decorated function's qualified name, holding one entry per call, here one
`(B, H, N, N)` numpy array per block (N = 1 CLS token + 8 x 8 patches).""",
    ),
    (
        "code",
        """get_local.activate()
image = batch.images[:1]  # the tensor the model sees (normalized with MEAN, STD)
with torch.no_grad():
    logits = model(image)
print("predicted:", SHAPES[logits.argmax()], "| true:", SHAPES[batch.labels[0]])

cache = get_local.cache
print(list(cache.keys()))
attention_maps = cache["Attention.forward"]
print(len(attention_maps), attention_maps[0].shape)""",
    ),
    (
        "markdown",
        """## One head

A query row per token, a key column per token. In the last layer the
columns of the object's patches light up: every query reads the object.""",
    ),
    (
        "code",
        """from visualizer import plot

last = len(attention_maps) - 1
plot.plot_head(attention_maps[last], head=0, layer=last)""",
    ),
    ("markdown", "## All heads of a layer: the first, then the last"),
    ("code", "plot.plot_heads(attention_maps[0], layer=0, ncols=5)"),
    ("code", "plot.plot_heads(attention_maps[last], layer=last, ncols=5)"),
    (
        "markdown",
        """## One query patch's attention over the image

The patch under the object's centre (outlined), and where it looks. With
`show_cls=True` a third panel gives the weight it puts on the CLS token, on
the same colour scale (the original's `grid_to_grid_with_cls`).""",
    ),
    (
        "code",
        """x0, y0, x1, y1 = batch.boxes[0]
query = (int((y0 + y1) / 2) // model.patch_size, int((x0 + x1) / 2) // model.patch_size)
geometry = dict(
    grid_size=model.grid_size, num_prefix_tokens=model.num_prefix_tokens, mean=MEAN, std=STD
)
plot.plot_query_attention(attention_maps[last], query, image, layer=last, **geometry)""",
    ),
    (
        "code",
        """plot.plot_query_attention(
    attention_maps[last], query, image, layer=last, show_cls=True, **geometry
)""",
    ),
    (
        "markdown",
        """## CLS attention per head, with DINO's threshold masks

Shaded: the fewest patches that hold 60% of each head's CLS attention.""",
    ),
    (
        "code",
        """plot.plot_cls_attention(
    attention_maps[last], image, layer=last, threshold=0.6, ncols=5, **geometry
)""",
    ),
    (
        "markdown",
        """## Explore every layer and head interactively

`explore` packs the maps into one self-contained page: hover a patch to see
where it looks, pick a layer (named by its module path) and a head, or the
mean / max over heads, or attention rollout; the head thumbnails follow the
mouse. It needs no internet and no kernel: it keeps working in the saved
notebook, in its HTML export and as a file (`.save("explorer.html")`).""",
    ),
    (
        "code",
        """from visualizer import capture_attention, explore
from visualizer.analysis import ImageGeometry

with capture_attention(model) as maps, torch.no_grad():
    model(image)
explore(maps, image=image, geometry=ImageGeometry.from_model(model, mean=MEAN, std=STD))""",
    ),
    (
        "markdown",
        """## Mean attention distance and attention rollout, over a batch

Every item and every head, not item 0 and the head mean only. Mean attention
distance: how far each head looks, in pixels. Rollout: how much the CLS output
draws on each patch through all layers.""",
    ),
    (
        "code",
        """from visualizer import analysis

get_local.clear()
with torch.no_grad():
    model(batch.images[:64])
maps = get_local.cache["Attention.forward"]
distances = analysis.mean_attention_distance(maps, model.grid_size, patch_size=model.patch_size)
fig = plot.plot_mean_attention_distance(distances)
# From zero: every head looks far; uniform attention over the image would give 16.5 px.
fig.axes[0].set_ylim(0, 20)
fig""",
    ),
    (
        "code",
        """rollout = analysis.attention_rollout(maps)
plot.plot_rollout(
    rollout, batch.images[:64], batch_index=1, grid_size=model.grid_size, mean=MEAN, std=STD
)""",
    ),
    (
        "markdown",
        """## Clear, and switch off

`clear()` empties the lists (keys stay); `deactivate()` gives
`Attention.forward` its original code back, for the next round of training.""",
    ),
    (
        "code",
        """get_local.clear()
get_local.deactivate()
print(get_local.cache, get_local.is_activate)""",
    ),
]


def build():
    """The notebook, unexecuted."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    notebook.cells = [make[kind](source) for kind, source in CELLS]
    return notebook


def execute(notebook, cwd, timeout=300):
    """Run every cell in a fresh kernel started in ``cwd``; the notebook gains its outputs."""
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return notebook


def main():
    notebook = execute(build(), ROOT)
    # Stable ids, so regenerating changes the file only where outputs changed.
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index}"
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    sys.exit(main())

"""The original Visualizer walkthrough, on a ViT that has learned something.

    python examples/vit_walkthrough.py                 # 20-35 s on two CPU cores
    python examples/vit_walkthrough.py --out figs --steps 100 --seed 1

A small ViT (examples/toy_vit.py, whose `Attention.forward` carries
`@get_local('attn')`) learns to tell circles, squares and triangles apart on
cluttered backgrounds. The loop the library exists for:

    train (decorator in place, capture off) -> capture and draw -> train -> capture and draw

Each stage draws one head's map, all heads of a layer, one object patch's
attention over the image (without and with the weight it gives CLS) and the
CLS attention of every head with DINO's threshold masks, and prints how much
of the last layer's CLS attention falls on the object's patches against the
share uniform attention would give. With random weights the two are close
(a random-weight map is noise, slightly drawn to bright patches); after
training the CLS token looks at the object, at about three times that share.

Figures go to --out (default out/vit_walkthrough) as <figure>_step<N>.png, with
the trained weights as vit.pt for the mean-attention-distance and rollout
examples (--checkpoint), and the trained model's maps as explorer.html: one
self-contained page to hover every patch of every layer and head, offline.
"""
import argparse
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path; the repository
# root is needed to import `examples.*` (one module name for the ViT, so
# get_local sees one `Attention.forward`, however the examples are run).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.shapes_data import MEAN, STD  # noqa: E402
from examples.train import (  # noqa: E402
    ATTENTION_KEY,
    build_vit,
    evaluation_batch,
    object_attention_share,
    train_vit,
)
from visualizer import capture_attention, explore, get_local, plot  # noqa: E402
from visualizer.analysis import ImageGeometry  # noqa: E402

DPI = 90


def draw(model, batch, index, out, stage):
    """Capture one forward and save every figure kind for image ``index``; return the paths."""
    image = batch.images[index : index + 1]  # the tensor the model sees, batch of one
    # The classic API: switch capture on, forward, read the cache, clear it.
    get_local.activate()
    with torch.no_grad():
        model(image)
    maps = get_local.cache[ATTENTION_KEY]  # one (1, H, N, N) numpy array per block
    get_local.clear()
    get_local.deactivate()

    last = len(maps) - 1
    # Grid, prefix tokens (CLS) and patch size read off the model, given once;
    # mean/std undo the input's normalization to draw the image it saw.
    geometry = ImageGeometry.from_model(model, mean=MEAN, std=STD)
    # The query patch: the one under the object's centre, so its row shows
    # where an object patch looks.
    x0, y0, x1, y1 = batch.boxes[index]
    query = (int((y0 + y1) / 2) // model.patch_size, int((x0 + x1) / 2) // model.patch_size)
    figures = {
        "head": plot.head(maps[last], head=0, layer=last),
        "heads_first_layer": plot.heads(maps[0], layer=0, ncols=5),
        "heads_last_layer": plot.heads(maps[last], layer=last, ncols=5),
        "query": plot.query(maps[last], query, image, layer=last, geometry=geometry),
        "query_with_cls": plot.query(
            maps[last], query, image, layer=last, show_cls=True, geometry=geometry
        ),
        "cls_attention": plot.cls_attention(
            maps[last], image, layer=last, threshold=0.6, ncols=5, geometry=geometry
        ),
    }
    paths = []
    for name, figure in figures.items():
        path = out / f"{name}_step{stage}.png"
        figure.savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def write_explorer(model, batch, index, out):
    """The interactive explorer of image ``index``, every layer and head, as out/explorer.html."""
    image = batch.images[index : index + 1]
    # capture_attention names each map by its module path (blocks.0.attn, ...).
    with capture_attention(model) as maps, torch.no_grad():
        model(image)
    geometry = ImageGeometry.from_model(model, mean=MEAN, std=STD)
    return explore(maps, image=image, geometry=geometry).save(out / "explorer.html")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/vit_walkthrough"))
    parser.add_argument("--steps", type=int, default=150, help="training steps per round (two)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", type=int, default=0, help="index of the held-out image to draw")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    model = build_vit(args.seed)  # Attention.forward is decorated; nothing is captured yet
    batch = evaluation_batch()  # held-out images, with their object masks
    shares = {0: object_attention_share(model, batch)}
    print(f"step 0 (random weights): {shares[0]}")
    figures = draw(model, batch, args.image, args.out, 0)

    for round_index in (1, 2):
        step = round_index * args.steps
        print(f"training round {round_index}: steps {step - args.steps + 1}-{step}")
        train_vit(model, args.steps, seed=args.seed + round_index)
        shares[step] = object_attention_share(model, batch)
        print(f"step {step}: {shares[step]}")
        figures += draw(model, batch, args.image, args.out, step)

    checkpoint = args.out / "vit.pt"
    torch.save(model.state_dict(), checkpoint)
    explorer = write_explorer(model, batch, args.image, args.out)
    before, after = shares[0], shares[2 * args.steps]
    print(
        f"{len(figures)} figures, the checkpoint {checkpoint.name} and {explorer.name} written to "
        f"{args.out}/"
    )
    print(
        f"last-layer CLS attention on the object: {before.on_object:.1%} before training, "
        f"{after.on_object:.1%} after (uniform share {after.uniform:.1%})"
    )
    return {"shares": shares, "figures": figures, "checkpoint": checkpoint, "explorer": explorer}


if __name__ == "__main__":
    main()

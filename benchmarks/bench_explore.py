"""The explorer in a real browser: page size, first paint and hover redraw, timed inside the page.

Pages are built with `visualizer.explore` from random softmax maps of the
sizes that matter and opened from disk in headless Chromium (Debian's
`chromium`, driven by Playwright). Timings are `performance.now()` readings
taken by the page itself (its `timings` API):

- first paint: from navigation start to the end of the first drawing (HTML
  parsed, data decoded, first view drawn);
- hover redraw: the page's work for one `mousemove` over the canvas (decode
  the row, fuse heads, draw the overlay, the prefix cells, the legend and
  every head's thumbnail), for ``--hovers`` real mouse moves to random patches.

Cases:

- ViT-B/16 at 224 px: 12 layers x 12 heads x 197 x 197, every map embedded;
- DINOv2 geometry at 518 px (CLS + 37 x 37 = 1370 tokens): ``--dino-layers``
  layers of full maps given (default 2: 1370 x 1370 maps are 90 MB a layer in
  float32), of which the 10 MB page embeds what fits (said on the page);
- DINOv2 at 518 px, CLS rows only (``rows=0`` captures): 12 x 12 x 1 x 1370.

Run: python benchmarks/bench_explore.py
(needs: apt-get install -y chromium && pip install playwright)
"""

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks._common import cpu_model  # noqa: E402
from visualizer import explore  # noqa: E402
from visualizer.analysis import ImageGeometry  # noqa: E402


def softmax_layers(layers, heads, queries, keys, seed, sharpness=4.0):
    """``layers`` maps ``(1, heads, queries, keys)``, float32, rows summing to 1."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(layers):
        scores = rng.standard_normal((1, heads, queries, keys), dtype=np.float32) * sharpness
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        maps.append(scores)
    return maps


def cases(dino_layers):
    rng = np.random.default_rng(0)
    vit = ImageGeometry(grid_size=14, num_prefix_tokens=1, patch_size=16)
    dino = ImageGeometry(grid_size=37, num_prefix_tokens=1, patch_size=14)
    yield "ViT-B/16 224 px, 12x12x197x197", softmax_layers(12, 12, 197, 197, 1), rng.random(
        (224, 224, 3)
    ), vit
    yield f"DINOv2 518 px, {dino_layers}x12x1370x1370 given", softmax_layers(
        dino_layers, 12, 1370, 1370, 2
    ), rng.random((518, 518, 3)), dino
    yield "DINOv2 518 px, CLS rows 12x12x1x1370", softmax_layers(12, 12, 1, 1370, 3), rng.random(
        (518, 518, 3)
    ), dino


def measure(browser, page, hovers, grid, seed):
    """Open the page, hover ``hovers`` random patches with the mouse; return the page's timings."""
    tab = browser.new_page(viewport={"width": 1200, "height": 900})
    with tempfile.TemporaryDirectory() as folder:
        path = page.save(pathlib.Path(folder) / "explorer.html")
        tab.goto(path.as_uri())
        tab.wait_for_selector(".visualizer-explorer[data-ready='1']")
        api = f"window.visualizerExplorers[{page.id!r}]"
        first_paint = tab.evaluate(f"{api}.timings.firstPaint")
        box = tab.locator(f"#{page.id} canvas.vx-canvas").bounding_box()
        before = tab.evaluate(f"{api}.timings.redraws.length")
        rng = np.random.default_rng(seed)
        for row, col in rng.integers(0, grid, size=(hovers, 2)):
            tab.mouse.move(
                box["x"] + (col + 0.5) * box["width"] / grid,
                box["y"] + (row + 0.5) * box["height"] / grid,
            )
        redraws = tab.evaluate(f"{api}.timings.redraws.slice({before})")
        head_change = tab.evaluate(f"{api}.setHead(1)")
        matrix = tab.evaluate(f"{api}.setView('matrix')")
    tab.close()
    return first_paint, redraws, head_change, matrix


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hovers", type=int, default=200)
    parser.add_argument("--dino-layers", type=int, default=2)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        version = browser.version
        for seed, (name, maps, image, geometry) in enumerate(cases(args.dino_layers)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                page = explore(maps, image=image, geometry=geometry)
            first_paint, redraws, head_change, matrix = measure(
                browser, page, args.hovers, geometry.grid_size[0], seed
            )
            ordered = sorted(redraws)
            p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
            embedded = f"{len(page.layer_names)} layers" + (" (some left out)" if caught else "")
            rows.append(
                (name, embedded, page.nbytes / 1e6, first_paint, statistics.median(redraws), p95,
                 max(redraws), head_change, matrix)
            )
            del maps, page
        browser.close()
    print(f"Chromium {version}, {cpu_model()}, {args.hovers} mouse hovers per case\n")
    print(
        "| case | embedded | page MB | first paint ms | hover redraw median ms | p95 ms | max ms "
        "| head change ms | matrix view ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, embedded, size, paint, median, p95, largest, head, matrix in rows:
        print(
            f"| {name} | {embedded} | {size:.2f} | {paint:.0f} | {median:.2f} | {p95:.2f} | "
            f"{largest:.2f} | {head:.2f} | {matrix:.1f} |"
        )


if __name__ == "__main__":
    main()

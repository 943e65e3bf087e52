"""The explorer in a real browser: headless Chromium driven by Playwright.

The page is opened from disk; every request other than the page itself fails
the test (and is aborted), as does any console error. The mouse moves over
patches and tokens, the page's own controls change layer and head, and what
the page says it drew (its `state()` API) is compared with the captured numpy
maps within the error bound the page states; the hottest patch is read from
the canvas pixels.

Needs Debian's chromium and Playwright for Python (`.ci/run` installs both):

    apt-get install -y chromium && pip install playwright

Without them the module is skipped with that command as the reason.
"""
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

INSTALL = "apt-get install -y chromium && pip install playwright"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
if CHROMIUM is None or sync_playwright is None:
    pytest.skip(
        f"the browser tests need Chromium and Playwright: {INSTALL}", allow_module_level=True
    )

from tests.explore_cases import (  # noqa: E402
    BOUND_PER_ROW_MAX,
    bart_case,
    detr_case,
    payload,
    softmax_maps,
    vit_case,
)
from visualizer import explore  # noqa: E402
from visualizer.analysis import ImageGeometry  # noqa: E402

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


class Opened:
    """One page opened from disk, with every request and console error recorded."""

    def __init__(self, browser, path, tolerated=()):
        self.url = path.resolve().as_uri()
        self.page = browser.new_page(viewport={"width": 1100, "height": 800})
        self.requests, self.errors = [], []
        self.tolerated = set(tolerated)  # requests a host page makes, aborted but not ours
        self.page.on("request", self._request)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.route("**/*", self._route)
        self.page.goto(self.url)
        self.page.wait_for_selector(".visualizer-explorer[data-ready='1']")

    def _console(self, message):
        if message.type == "error":
            self.errors.append(message.text)

    def _request(self, request):
        if request.url != self.url and not request.url.startswith("data:"):
            self.requests.append(request.url)

    def _route(self, route):
        if route.request.url == self.url:
            route.continue_()
        else:
            route.abort()

    def ours(self):
        """Requests and console errors the page's host did not cause."""
        requests = [url for url in self.requests if url not in self.tolerated]
        errors = [
            text for text in self.errors
            if not (self.tolerated and "Failed to load resource" in text)
        ]
        return requests, errors

    def api(self, root_id, call):
        return self.page.evaluate(f"window.visualizerExplorers[{root_id!r}].{call}")

    def state(self, root_id):
        return self.api(root_id, "state()")

    def canvas_box(self, root_id):
        canvas = self.page.locator(f"#{root_id} canvas.vx-canvas")
        canvas.scroll_into_view_if_needed()  # the mouse reaches what is in the viewport
        return canvas.bounding_box()


@pytest.fixture
def open_page(browser, tmp_path):
    """Open an Explorer (saved to tmp_path) or an HTML file; fail on requests and errors."""
    opened = []

    def open_(page_or_path, tolerated=()):
        path = page_or_path
        if not isinstance(page_or_path, Path):
            path = page_or_path.save(tmp_path / f"page{len(opened)}.html")
        opened.append(Opened(browser, path, tolerated))
        return opened[-1]

    yield open_
    for page in opened:
        requests, errors = page.ours()
        page.page.close()
        assert not requests, f"the page made network requests: {requests}"
        assert not errors, f"console errors: {errors}"


@pytest.fixture(scope="module")
def vit():
    return vit_case()


def assert_drawn(drawn, expected, rows):
    """``drawn`` within the stated bound of ``expected``; ``rows`` are the head rows it fuses."""
    bound = np.max(np.asarray(rows, dtype=np.float64).max(axis=-1)) * BOUND_PER_ROW_MAX
    error = np.abs(np.asarray(drawn, dtype=np.float64) - expected)
    assert error.max() <= bound, f"max error {error.max():.3g} over the bound {bound:.3g}"


def patch_centre(box, grid, row, col):
    return (
        box["x"] + (col + 0.5) * box["width"] / grid[1],
        box["y"] + (row + 0.5) * box["height"] / grid[0],
    )


# ------------------------------------------------------------------ image view


def test_hovering_patches_draws_their_rows_for_the_chosen_layer_and_head(vit, open_page):
    page = explore(vit.maps, image=vit.image, geometry=vit.geometry)
    opened = open_page(page)
    names = list(vit.maps)
    assert opened.state(page.id)["layer"] == names[-1]  # the last layer first
    box = opened.canvas_box(page.id)
    prefix = vit.geometry.num_prefix_tokens
    rng = np.random.default_rng(0)
    for layer_index in (2, 0):
        opened.page.select_option(f"#{page.id} select.vx-layer", str(layer_index))
        item = vit.maps[names[layer_index]][0][0]  # (H, N, N)
        for head in ("mean", "2", "max"):
            opened.page.select_option(f"#{page.id} select.vx-head", head)
            for row, col in rng.integers(0, 8, size=(4, 2)):
                opened.page.mouse.move(*patch_centre(box, (8, 8), row, col))
                state = opened.state(page.id)
                token = prefix + row * 8 + col
                assert state["layer"] == names[layer_index] and state["query"] == token
                rows = item[:, token]
                expected = {"mean": rows.mean(0), "max": rows.max(0), "2": rows[2]}[head]
                assert_drawn(state["drawn"]["values"], expected, rows)
                # The readout names the value under the cursor (the query patch itself).
                assert f"patch {row * 8 + col}" in state["readout"]


def test_the_hottest_drawn_patch_is_the_maps_argmax(vit, open_page):
    # A flat grey image: the overlay's brightness is then the attention alone.
    grey = np.full((32, 32, 3), 0.5)
    page = explore(vit.maps, image=grey, geometry=ImageGeometry(8, 3, patch_size=4))
    opened = open_page(page)
    item = vit.maps[list(vit.maps)[-1]][0][0].mean(0)  # (N, N), mean of heads
    read_brightest = f"""() => {{
        const canvas = document.querySelector('#{page.id} canvas.vx-canvas');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        const light = [];
        for (let r = 0; r < 8; r++) for (let c = 0; c < 8; c++) {{
            const x = Math.floor((c + 0.5) * canvas.width / 8);
            const y = Math.floor((r + 0.5) * canvas.height / 8);
            const i = 4 * (y * canvas.width + x);
            light.push(0.2126 * pixels[i] + 0.7152 * pixels[i + 1] + 0.0722 * pixels[i + 2]);
        }}
        return light;
    }}"""
    checked = 0
    for token in range(3, 67, 5):
        patches = item[token, 3:]
        top, second = np.sort(patches)[::-1][:2]
        if top - second < 0.02 * top:
            continue  # a tie within the colour scale's resolution: no argmax to see
        opened.api(page.id, f"hover({token})")
        light = np.array(opened.page.evaluate(read_brightest))
        assert light.argmax() == patches.argmax(), (token, light.argmax(), patches.argmax())
        assert opened.state(page.id)["drawn"]["hottestPatch"] == patches.argmax()
        checked += 1
    assert checked >= 5


def test_prefix_cells_thumbnails_and_rollout(vit, open_page):
    page = explore(vit.maps, image=vit.image, geometry=vit.geometry)
    opened = open_page(page)
    item = vit.maps[list(vit.maps)[-1]][0][0]
    opened.api(page.id, "hover(40)")
    cells = opened.page.locator(f"#{page.id} .vx-prefix button")
    assert cells.all_text_contents()[0].startswith("CLS ") and cells.count() == 3
    # Each prefix cell shows the weight the query gives that token (4 decimals).
    for token, text in enumerate(cells.all_text_contents()):
        bound = 5e-5 + item[:, 40].max() * BOUND_PER_ROW_MAX  # printed to 4 decimals
        assert abs(float(text.split()[-1]) - item[:, 40, token].mean()) < bound
    cells.first.click()  # the CLS row, one click away
    state = opened.state(page.id)
    assert state["query"] == 0 and state["pinned"]
    assert_drawn(state["drawn"]["values"], item[:, 0].mean(0), item[:, 0])
    thumbs = opened.page.locator(f"#{page.id} .vx-thumb")
    assert thumbs.count() == 4
    thumbs.nth(3).click()
    state = opened.state(page.id)
    assert state["head"] == 3
    assert_drawn(state["drawn"]["values"], item[3, 0], item[3:4, 0])
    opened.page.select_option(f"#{page.id} select.vx-layer", str(len(page.layer_names) - 1))
    state = opened.state(page.id)
    assert state["layer"].startswith("rollout") and state["query"] == 0
    rollout = payload(page.html)["layers"][-1]["values"][0]
    np.testing.assert_allclose(state["drawn"]["values"], rollout[0], atol=1e-9)


def test_a_cls_row_capture_shows_its_row_and_says_what_needs_full_maps(open_page):
    case = vit_case(rows=0)
    page = explore(case.maps, image=case.image, geometry=case.geometry)
    opened = open_page(page)
    box = opened.canvas_box(page.id)
    opened.page.mouse.move(*patch_centre(box, (8, 8), 5, 6))
    state = opened.state(page.id)
    cls_row = case.maps[list(case.maps)[-1]][0][0][:, 0]
    assert state["query"] == 0 and state["key"] == 3 + 5 * 8 + 6
    assert_drawn(state["drawn"]["values"], cls_row.mean(0), cls_row)
    assert "full maps" in state["message"] and "rows=" in state["message"]
    assert "patch 46" in state["readout"]


# ------------------------------------------------------------------ tokens


def matrix_mouse(opened, root_id):
    """``(query row, key) -> (x, y)`` on the screen of the matrix view's cell."""
    box, frame = opened.canvas_box(root_id), opened.state(root_id)["matrix"]
    width = opened.page.evaluate(
        f"document.querySelector('#{root_id} canvas.vx-canvas').width"
    )
    scale = box["width"] / width  # css pixels per canvas pixel
    return lambda row, key: (
        box["x"] + (frame["left"] + (key + 0.5) * frame["cell"]) * scale,
        box["y"] + (frame["top"] + (row + 0.5) * frame["cell"]) * scale,
    )


def test_token_views_of_an_encoder_decoder_under_module_names(open_page):
    pytest.importorskip("transformers")
    case = bart_case()
    page = explore(case.maps, tokens=case.tokens, query_tokens=case.query_tokens, batch=1)
    opened = open_page(page)
    cross = "model.decoder.layers.1.encoder_attn"
    assert opened.api(page.id, "layers()") == list(case.maps)
    opened.page.select_option(f"#{page.id} select.vx-layer", str(list(case.maps).index(cross)))
    state = opened.state(page.id)
    assert state["view"] == "head view" and state["head"] == "all"
    item = case.maps[cross][0][1]  # (H, 5 decoder tokens, 8 encoder tokens)
    box = opened.canvas_box(page.id)
    for query in (0, 3):
        # Query labels on the left, rows of 18 px from y = 5 (canvas pixels).
        opened.page.mouse.move(box["x"] + 100, box["y"] + 5 + 18 * query + 9)
        state = opened.state(page.id)
        assert state["query"] == query
        for head_row, expected in zip(state["drawn"]["values"], item[:, query]):
            assert_drawn(head_row, expected, expected[None])
    opened.page.select_option(f"#{page.id} select.vx-head", "1")
    opened.page.mouse.move(box["x"] + 100, box["y"] + 5 + 18 * 4 + 9)
    assert_drawn(opened.state(page.id)["drawn"]["values"], item[1, 4], item[1:2, 4])
    # Keys on the right: hovering one isolates the lines into it.
    opened.page.mouse.move(box["x"] + 340, box["y"] + 5 + 18 * 6 + 9)
    state = opened.state(page.id)
    assert state["key"] == 6 and state["query"] is None

    # The decoder's self-attention is causal: its upper triangle is masked.
    opened.api(page.id, f"setLayer({'model.decoder.layers.0.self_attn'!r})")
    opened.api(page.id, "setView('matrix')")
    matrix_cell = matrix_mouse(opened, page.id)
    opened.page.mouse.move(*matrix_cell(0, 3))
    assert "masked" in opened.state(page.id)["readout"]
    opened.page.mouse.move(*matrix_cell(3, 0))
    state = opened.state(page.id)
    assert "masked" not in state["readout"] and "d3" in state["readout"]

    # A token that is markup is shown as text and never runs.
    opened.api(page.id, f"setLayer({'model.encoder.layers.0.self_attn'!r})")
    opened.api(page.id, "setView('matrix')")
    opened.page.mouse.move(*matrix_mouse(opened, page.id)(0, 2))
    state = opened.state(page.id)
    assert state["query"] == 0 and state["key"] == 2
    assert case.tokens[2] in state["readout"]
    assert opened.page.evaluate("window.__injected") is None


def test_padded_keys_are_shown_as_masked(open_page):
    maps = softmax_maps((1, 2, 6, 6))
    maps[..., 4:] = 0  # two padded keys
    maps /= maps.sum(-1, keepdims=True)
    page = explore(maps, tokens=["a", "b", "c", "d", "[PAD]", "[PAD]"])
    opened = open_page(page)
    assert opened.state(page.id)["maskedKeys"] == [4, 5]


# ------------------------------------------------------------------ cross-attention


def test_hovering_an_object_query_draws_its_map_over_the_image(open_page):
    case = detr_case()
    page = explore(case.maps, image=case.image, geometry=case.geometry, boxes=case.boxes)
    opened = open_page(page)
    layer = "decoder.1.cross_attn"
    opened.api(page.id, f"setLayer({layer!r})")
    item = case.maps[layer][0][0]  # (H, 3, 144)
    queries = opened.page.locator(f"#{page.id} .vx-queries button")
    assert queries.count() == 3
    for query in (2, 0, 1):
        queries.nth(query).hover()
        state = opened.state(page.id)
        assert state["kind"] == "cross" and state["query"] == query
        assert_drawn(state["drawn"]["values"], item[:, query].mean(0), item[:, query])
    # The encoder's self-attention over the same image is an image view.
    opened.api(page.id, "setLayer('encoder.layers.1.self_attn')")
    assert opened.state(page.id)["view"] == "image"


# ------------------------------------------------------------------ the page as a whole


def test_a_page_over_budget_says_so_in_the_page(open_page):
    maps = softmax_maps((6, 1, 4, 100, 100))
    with pytest.warns(RuntimeWarning, match="left out"):
        page = explore(maps, max_bytes=250_000)
    opened = open_page(page)
    text = opened.page.locator(f"#{page.id} .vx-warning").text_content()
    assert "left out" in text.lower() and "layers=" in text and "rows=" in text
    assert opened.state(page.id)["leftOut"] == text


def test_two_explorers_on_one_page_do_not_interfere(vit, open_page, tmp_path):
    first = explore(vit.maps, image=vit.image, geometry=vit.geometry)
    second = explore(vit.maps, image=vit.image, geometry=vit.geometry, layers=0)
    path = tmp_path / "two.html"
    both = first._repr_html_() + second._repr_html_()
    path.write_text(f"<!DOCTYPE html><html><body>{both}</body></html>")
    opened = open_page(path)
    before = opened.state(second.id)
    box = opened.canvas_box(first.id)
    opened.page.mouse.move(*patch_centre(box, (8, 8), 2, 2))
    opened.page.select_option(f"#{first.id} select.vx-head", "1")
    assert opened.state(first.id)["query"] == 3 + 2 * 8 + 2
    assert opened.state(second.id) == before
    # Each script replaced its own "needs the script to run" text.
    assert opened.page.locator(".vx-fallback").count() == 0
    assert opened.page.locator(".visualizer-explorer .vx-app").count() == 2


def test_an_output_inserted_as_jupyterlab_inserts_it(vit, open_page, tmp_path):
    # JupyterLab (and VS Code) put a trusted HTML output in with innerHTML, whose
    # scripts never run, then replace each script with a fresh copy, which runs.
    page = explore(vit.maps, image=vit.image, geometry=vit.geometry)
    fragment = json.dumps(page._repr_html_()).replace("</", "<\\/")
    host = tmp_path / "host.html"
    host.write_text(
        "<!DOCTYPE html><html><body><script>"
        f"const output = document.createElement('div'); output.innerHTML = {fragment};"
        "for (const old of output.querySelectorAll('script')) {"
        "  const fresh = document.createElement('script');"
        "  for (const a of old.attributes) fresh.setAttribute(a.name, a.value);"
        "  fresh.textContent = old.textContent; old.replaceWith(fresh); }"
        "document.body.appendChild(output);"
        "</script></body></html>"
    )
    opened = open_page(host)
    box = opened.canvas_box(page.id)
    opened.page.mouse.move(*patch_centre(box, (8, 8), 6, 1))
    assert opened.state(page.id)["query"] == 3 + 6 * 8 + 1


def test_screenshot_and_the_save_png_control(vit, open_page, tmp_path):
    from PIL import Image

    page = explore(vit.maps, image=vit.image, geometry=vit.geometry)
    opened = open_page(page)
    box = opened.canvas_box(page.id)
    opened.page.mouse.move(*patch_centre(box, (8, 8), 3, 4))
    shot = tmp_path / "explorer.png"
    opened.page.locator(f"#{page.id}").screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 20
    gallery = os.environ.get("VISUALIZER_GALLERY")  # where to keep it (the README's screenshot)
    if gallery:
        shutil.copy(shot, Path(gallery) / "explorer.png")
    with opened.page.expect_download() as download:
        opened.page.locator(f"#{page.id} button.vx-save").click()
    saved = Path(download.value.path()).read_bytes()
    assert saved.startswith(PNG_SIGNATURE)
    figure = np.asarray(Image.open(io.BytesIO(saved)).convert("RGB"), dtype=np.float64)
    assert figure.shape[0] > 300 and figure.std() > 20


def test_the_network_guard_catches_a_request(vit, browser, tmp_path):
    page = explore(softmax_maps((1, 3, 3)))
    path = tmp_path / "leaky.html"
    path.write_text(page.html.replace("</body>", '<img src="http://127.0.0.1:9/x.png"></body>'))
    opened = Opened(browser, path)
    opened.page.wait_for_timeout(200)
    requests, _ = opened.ours()
    opened.page.close()
    assert requests == ["http://127.0.0.1:9/x.png"]


def test_the_demo_notebooks_explorer_works_in_its_nbconvert_export(open_page, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbconvert = pytest.importorskip("nbconvert")
    notebook = nbformat.read(ROOT / "demo.ipynb", as_version=4)
    body, _ = nbconvert.HTMLExporter().from_notebook_node(notebook)
    assert "visualizer-explorer" in body, "demo.ipynb has no explorer output"
    path = tmp_path / "demo.html"
    path.write_text(body, encoding="utf-8")
    # nbconvert's template asks a CDN for require.js and MathJax; offline they
    # fail, which is what this checks the explorer survives.
    import re

    template = re.findall(r'<script[^>]+src="(https://[^"]+)"', body)
    opened = open_page(path, tolerated=template)
    root_id = opened.page.locator(".visualizer-explorer").first.get_attribute("id")
    data = payload(opened.page.locator(f"#{root_id}").inner_html())
    layer = data["layers"][opened.state(root_id)["layerIndex"]]
    grid, prefix = layer["grid"], data["prefix"]
    box = opened.canvas_box(root_id)
    for row, col in ((1, 1), (4, 6), (7, 2)):
        opened.page.mouse.move(*patch_centre(box, grid, row, col))
        state = opened.state(root_id)
        token = prefix + row * grid[1] + col
        assert state["query"] == token
        expected = layer["values"][:, token].mean(0)
        np.testing.assert_allclose(state["drawn"]["values"], expected, atol=1e-9)

"""visualizer.plot: render headless and check what was drawn."""

import ast
import inspect
import io
import pathlib
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from visualizer import analysis, plot  # noqa: E402
from visualizer._errors import VisualizerError  # noqa: E402


def random_maps(shape, seed=0):
    logits = np.random.default_rng(seed).normal(scale=2.0, size=shape)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def blocks(grid_map, cell_height, cell_width):
    """Nearest upsampling written independently: each patch a constant block."""
    return np.kron(grid_map, np.ones((cell_height, cell_width)))


def rectangles(ax):
    return [(patch.get_xy(), patch.get_width(), patch.get_height()) for patch in ax.patches]


def suptitle(fig):
    """The figure title (``Figure.get_suptitle`` exists only from matplotlib 3.8)."""
    (text,) = fig.texts
    return text.get_text()


def rendered(fig):
    """Draw the figure to PNG bytes with no display: proves the headless path works."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------- import rules


def test_plot_never_imports_capture():
    tree = ast.parse(pathlib.Path(plot.__file__).read_text())
    imported = [
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ] + [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    assert not [name for name in imported if "capture" in name]


def test_importing_plot_does_not_import_pyplot():
    code = "import sys, visualizer.plot; print('matplotlib.pyplot' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# -------------------------------------------------------------------- heads


def test_plot_head_draws_the_head_with_a_colorbar():
    attn = random_maps((2, 3, 10, 10))
    fig = plot.plot_head(attn, head=2, batch_index=1, layer=7)
    assert isinstance(fig, Figure)
    heatmap, colorbar = fig.axes
    np.testing.assert_array_equal(heatmap.images[0].get_array(), attn[1, 2])
    assert heatmap.get_title() == "layer 7, head 2, item 1"
    assert colorbar.get_label() == "<colorbar>"
    assert rendered(fig).startswith(b"\x89PNG")


def test_plot_head_draws_into_given_axes():
    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert plot.plot_head(random_maps((3, 5, 5)), head=-1, ax=right) is fig
    assert not left.images and right.get_title() == "head 2"


def test_plot_heads_grid_has_every_head_and_the_mean():
    attn = random_maps((2, 5, 10, 10))
    fig = plot.plot_heads(attn, batch_index=1, layer=3, ncols=4)
    assert len(fig.axes) == 6
    for head in range(5):
        np.testing.assert_array_equal(fig.axes[head].images[0].get_array(), attn[1, head])
        assert fig.axes[head].get_title() == f"head {head}"
    np.testing.assert_allclose(fig.axes[5].images[0].get_array(), attn[1].mean(axis=0))
    assert fig.axes[5].get_title() == "mean of heads"
    assert suptitle(fig) == "layer 3, item 1"


# ---------------------------------------------------------- query attention


@pytest.mark.parametrize("query", [(1, 2), 6, -6])
def test_query_patch_is_outlined_at_its_pixels(query):
    # Grid 3x4 over a 30x80 image: each patch is 10 px high and 20 px wide.
    attn = random_maps((2, 1 + 12, 1 + 12))
    image = random_image(30, 80)
    with pytest.warns(
        UserWarning, match="patches would be 10.0x20.0 pixels"
    ):  # unusual, but drawn as asked
        fig = plot.plot_query_attention(
            attn, query, image, grid_size=(3, 4), head=1, mode="nearest"
        )
    image_ax, overlay_ax = fig.axes
    for ax in (image_ax, overlay_ax):
        assert rectangles(ax) == [((40.0, 10.0), 20.0, 10.0)]
    np.testing.assert_allclose(image_ax.images[0].get_array(), image / 255)
    token = 1 + 1 * 4 + 2
    expected = blocks(attn[1, token, 1:].reshape(3, 4), 10, 20)
    np.testing.assert_allclose(overlay_ax.images[1].get_array(), expected)
    assert image_ax.get_title() == "query patch (row 1, col 2)"
    assert overlay_ax.get_title() == "head 1"
    assert suptitle(fig) == f"attention of token {token}"
    rendered(fig)


def test_query_attention_with_cls_panel_and_registers():
    # DINOv2 with registers: CLS + 4 registers, 2x3 grid; batch of 2, second item.
    attn = random_maps((2, 4, 5 + 6, 5 + 6))
    fig = plot.plot_query_attention(
        attn,
        (0, 1),
        random_image(20, 30),
        grid_size=(2, 3),
        num_prefix_tokens=5,
        batch_index=1,
        show_cls=True,
    )
    image_ax, overlay_ax, cls_ax = fig.axes
    weights = attn[1, :, 5 + 1].mean(axis=0)  # head mean of the query's row
    np.testing.assert_allclose(cls_ax.images[0].get_array()[:, 0], weights[:5])
    assert cls_ax.get_title() == f"CLS {weights[0]:.3f}"
    assert [label.get_text() for label in cls_ax.get_yticklabels()] == [
        "CLS",
        "reg 1",
        "reg 2",
        "reg 3",
        "reg 4",
    ]
    # One colour scale for prefix and patches, so CLS's weight compares with the patches'.
    assert (
        overlay_ax.images[1].get_clim()
        == cls_ax.images[0].get_clim()
        == (weights.min(), weights.max())
    )
    assert overlay_ax.get_title() == "mean of heads"
    assert rectangles(image_ax) == [((10.0, 0.0), 10.0, 10.0)]
    assert suptitle(fig) == "attention of token 6, item 1"


def test_query_attention_without_image_uses_patch_coordinates():
    fig = plot.plot_query_attention(random_maps((1, 13, 13)), (2, 3), grid_size=(3, 4))
    assert rectangles(fig.axes[1]) == [((3.0, 2.0), 1.0, 1.0)]


def test_query_attention_errors():
    attn = random_maps((1, 13, 13))
    with pytest.raises(
        VisualizerError,
        match=r"plot.query: query row \(on the patch grid_size=\(3, 4\) of attn after "
        r"num_prefix_tokens=1\) "
        r"must be an int in \[-3, 3\); got 3",
    ):
        plot.plot_query_attention(attn, (3, 0), grid_size=(3, 4))
    with pytest.raises(VisualizerError, match="show_cls needs a CLS token"):
        plot.plot_query_attention(
            random_maps((1, 12, 12)), 0, grid_size=(3, 4), num_prefix_tokens=0, show_cls=True
        )


# ------------------------------------------------------------ CLS attention


def test_cls_attention_per_head_on_the_model_input_tensor():
    torch = pytest.importorskip("torch")
    mean, std = np.array(plot.IMAGENET_MEAN), np.array(plot.IMAGENET_STD)
    images = np.random.default_rng(1).random((2, 28, 42, 3))  # what the model saw, in [0, 1]
    model_input = torch.from_numpy(
        ((images - mean) / std).transpose(0, 3, 1, 2)
    )  # (B, 3, H, W) normalized
    attn = random_maps((2, 3, 1 + 6, 1 + 6))
    fig = plot.plot_cls_attention(
        torch.from_numpy(attn).to(torch.bfloat16).requires_grad_(True),
        model_input,
        grid_size=(2, 3),
        batch_index=1,
        mean=plot.IMAGENET_MEAN,
        std=plot.IMAGENET_STD,
        mode="nearest",
    )
    assert len(fig.axes) == 4
    seen = torch.from_numpy(attn).to(torch.bfloat16).float().numpy()[1, :, 0, 1:].reshape(3, 2, 3)
    for head, ax in enumerate(fig.axes[:3]):
        np.testing.assert_allclose(ax.images[0].get_array(), images[1], atol=1e-12)
        np.testing.assert_allclose(ax.images[1].get_array(), blocks(seen[head], 14, 14))
        assert ax.get_title() == f"head {head}"
    np.testing.assert_allclose(
        fig.axes[3].images[1].get_array(), blocks(seen.mean(axis=0), 14, 14), rtol=1e-6
    )
    assert suptitle(fig) == "CLS attention, item 1"
    rendered(fig)


def test_cls_attention_threshold_mask_layer():
    # Head 0 puts 70% of CLS mass on patch (1, 2): the 60% mask is that patch alone.
    attn = np.full((2, 1 + 6, 1 + 6), 0.05)
    attn[0, 0, 1:] = 0.3 / 5
    attn[0, 0, 1 + 5] = 0.7
    attn[0, 0, 0] = 0.0
    fig = plot.plot_cls_attention(
        attn, random_image(20, 30), grid_size=(2, 3), heads=[0], threshold=0.6, layer=11
    )
    ax = fig.axes[0]
    assert len(fig.axes) == 2 and len(ax.images) == 3
    kept = ~np.ma.getmaskarray(ax.images[2].get_array())
    expected = np.zeros((20, 30), bool)
    expected[10:, 20:] = True
    np.testing.assert_array_equal(kept, expected)
    assert ax.get_title() == "head 0, 60% mass"
    assert suptitle(fig) == "CLS attention, layer 11"


def test_cls_attention_masks_detected_artifacts_and_says_so():
    attn = random_maps((2, 4, 1 + 16, 1 + 16))
    spiked = attn * 0.6
    spiked[1, :, :, 1 + 9] += 0.4  # item 1: every query of every head looks at token 10
    fig = plot.plot_cls_attention(
        spiked, grid_size=(4, 4), batch_index=1, mask_artifacts=True, mode="nearest"
    )
    assert suptitle(fig) == "CLS attention, item 1, artifact tokens [10] zeroed"
    for head, ax in enumerate(fig.axes[:4]):
        shown = ax.images[0].get_array()  # no image: the map on the grid itself
        assert shown[2, 1] == 0.0
        expected = spiked[1, head, 0, 1:].reshape(4, 4).copy()
        expected[2, 1] = 0.0
        np.testing.assert_allclose(shown, expected)
    clean = plot.plot_cls_attention(spiked, grid_size=(4, 4), batch_index=0, mask_artifacts=True)
    assert suptitle(clean) == "CLS attention, item 0, no artifact tokens found"
    by_hand = plot.plot_cls_attention(spiked[0], grid_size=(4, 4), mask_artifacts=[3])
    assert suptitle(by_hand) == "CLS attention, artifact tokens [3] zeroed"
    assert by_hand.axes[0].images[0].get_array()[0, 2] == 0.0


def test_cls_attention_rejects_prefix_tokens_as_artifacts():
    with pytest.raises(
        VisualizerError, match=r"mask_artifacts must hold patch token indices in \[1, 17\); got 0"
    ):
        plot.plot_cls_attention(random_maps((2, 17, 17)), mask_artifacts=[0])


def test_raw_image_with_other_aspect_warns():
    with pytest.warns(UserWarning, match="pass the image the model saw"):
        plot.plot_cls_attention(random_maps((1, 17, 17)), random_image(40, 80))


# ------------------------------------------------- mean attention distance


def test_mean_attention_distance_plot_has_one_dot_per_layer_and_head():
    distances = np.arange(12, dtype=float).reshape(4, 3) * 10  # (L=4, H=3)
    fig = plot.plot_mean_attention_distance(distances)
    ax = fig.axes[0]
    assert len(ax.collections) == 3
    for head, collection in enumerate(ax.collections):
        np.testing.assert_array_equal(
            collection.get_offsets(), np.column_stack([np.arange(4), distances[:, head]])
        )
        assert collection.get_label() == f"head {head}"
    assert ax.get_xlabel() == "network depth (layer)"
    assert ax.get_ylabel() == "mean attention distance (pixels)"
    with pytest.raises(VisualizerError, match=r"distances must have shape \(L, H\)"):
        plot.plot_mean_attention_distance(distances[0])


# ------------------------------------------------------- cross-attention


def test_cross_attention_rows_per_query_with_boxes_and_heads():
    torch = pytest.importorskip("torch")
    cross = random_maps((2, 3, 10, 4 * 6))  # (B, H, Q, h*w): a 4x6 feature map
    boxes = np.array([[5.0, 10.0, 50.0, 30.0], [0.0, 0.0, 60.0, 40.0]])
    fig = plot.plot_cross_attention(
        torch.from_numpy(cross).half(),
        [7, 2],
        random_image(40, 60),
        grid_size=(4, 6),
        boxes=boxes,
        batch_index=1,
    )
    seen = torch.from_numpy(cross).half().float().numpy()
    assert len(fig.axes) == 2 * (2 + 3)
    for row, query in enumerate([7, 2]):
        image_ax, mean_ax, *head_axes = fig.axes[row * 5 : row * 5 + 5]
        x0, y0, x1, y1 = boxes[row]
        assert rectangles(image_ax) == [((x0, y0), x1 - x0, y1 - y0)]
        assert image_ax.get_title() == f"query {query}"
        np.testing.assert_allclose(
            mean_ax.images[0].get_array(), seen[1, :, query].mean(axis=0).reshape(4, 6), rtol=1e-6
        )
        for head, ax in enumerate(head_axes):
            np.testing.assert_array_equal(
                ax.images[0].get_array(), seen[1, head, query].reshape(4, 6)
            )
            assert ax.get_title() == f"head {head}"
    rendered(fig)


def test_cross_attention_head_averaged_input():
    cross = random_maps((1, 10, 12))  # (B, Q, h*w), nn.MultiheadAttention's default
    fig = plot.plot_cross_attention(cross, 4, random_image(30, 40), grid_size=(3, 4))
    assert [ax.get_title() for ax in fig.axes] == ["query 4", "attention"]
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), cross[0, 4].reshape(3, 4))
    with pytest.raises(VisualizerError, match=r"boxes must have shape \(1, 4\)"):
        plot.plot_cross_attention(
            cross, 4, random_image(30, 40), grid_size=(3, 4), boxes=np.zeros((2, 4))
        )


# ---------------------------------------------------------------- rollout


def test_rollout_overlay_is_the_cls_row_on_the_image():
    rollout = random_maps((2, 1 + 6, 1 + 6))
    image = random_image(20, 30)
    fig = Figure()
    ax = fig.add_subplot()
    assert (
        plot.plot_rollout(rollout, image, grid_size=(2, 3), batch_index=1, mode="nearest", ax=ax)
        is fig
    )
    np.testing.assert_allclose(ax.images[0].get_array(), image / 255)
    np.testing.assert_allclose(
        ax.images[1].get_array(), blocks(rollout[1, 0, 1:].reshape(2, 3), 10, 10)
    )
    assert ax.get_title() == "attention rollout (CLS)"


# ----------------------------------------------------------------- images


@pytest.mark.parametrize(
    "layout",
    ["hwc_uint8", "chw_float_numpy", "hwc_float_255"],
)
def test_image_layouts_display_the_same_picture(layout):
    image = random_image(16, 24)
    given = {
        "hwc_uint8": image,
        "chw_float_numpy": image.transpose(2, 0, 1) / 255.0,
        "hwc_float_255": image.astype(float),  # stretched to [0, 1] by its range
    }[layout]
    fig = plot.plot_rollout(np.eye(1 + 6), given, grid_size=(2, 3))
    shown = fig.axes[0].images[0].get_array()
    expected = image / 255.0
    if layout == "hwc_float_255":
        expected = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_allclose(shown, expected)


def test_bad_batch_index_is_reported():
    with pytest.raises(
        VisualizerError, match=r"plot.heads: batch_index must be an int in \[-2, 2\); got 2"
    ):
        plot.plot_heads(random_maps((2, 3, 5, 5)), batch_index=2)


def cuda_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_tensors_with_grad():
    import torch

    attn = torch.from_numpy(random_maps((2, 3, 17, 17))).to("cuda", torch.bfloat16)
    attn.requires_grad_(True)
    seen = attn.detach().float().cpu().numpy()
    fig = plot.plot_cls_attention(attn, batch_index=1, mode="nearest")
    np.testing.assert_array_equal(
        fig.axes[0].images[0].get_array(), seen[1, 0, 0, 1:].reshape(4, 4)
    )
    np.testing.assert_allclose(
        analysis.mean_attention_distance([attn]), analysis.mean_attention_distance([seen])
    )


def test_mean_attention_distance_axes_show_whole_layers_from_zero():
    fig = plot.plot_mean_attention_distance(np.array([[14.0, 15.0], [15.5, 16.0], [15.0, 16.5]]))
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [0, 1, 2]
    assert ax.get_ylim()[0] == 0


# ------------------------------------------------------------ one grammar

SINGLE_PANEL = ["head", "tokens", "head_view", "mean_attention_distance", "rollout"]
MULTI_PANEL = ["heads", "query", "cls_attention", "cross_attention"]
OLD_NAMES = {
    "plot_head": "head",
    "plot_heads": "heads",
    "plot_query_attention": "query",
    "plot_cls_attention": "cls_attention",
    "plot_mean_attention_distance": "mean_attention_distance",
    "plot_cross_attention": "cross_attention",
    "plot_rollout": "rollout",
}


@pytest.mark.parametrize("old, new", sorted(OLD_NAMES.items()))
def test_old_names_are_the_same_functions(old, new):
    assert getattr(plot, old) is getattr(plot, new)


@pytest.mark.parametrize("name", SINGLE_PANEL + MULTI_PANEL)
def test_one_panel_takes_ax_several_take_fig(name):
    parameters = inspect.signature(getattr(plot, name)).parameters
    where = "ax" if name in SINGLE_PANEL else "fig"
    assert where in parameters and ({"ax", "fig"} - {where}).isdisjoint(parameters)
    assert parameters[where].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters[where].default is None


# Each function drawn with small valid input, where= left to the test.
DRAW = {
    "head": lambda **where: plot.head(random_maps((2, 5, 5)), **where),
    "tokens": lambda **where: plot.tokens(random_maps((2, 3, 3)), ["a", "b", "c"], **where),
    "head_view": lambda **where: plot.head_view(random_maps((2, 3, 3)), ["a", "b", "c"], **where),
    "mean_attention_distance": lambda **where: plot.mean_attention_distance(
        np.ones((3, 2)), **where
    ),
    "rollout": lambda **where: plot.rollout(random_maps((5, 5)), **where),
    "heads": lambda **where: plot.heads(random_maps((2, 5, 5)), **where),
    "query": lambda **where: plot.query(random_maps((2, 5, 5)), 0, **where),
    "cls_attention": lambda **where: plot.cls_attention(random_maps((2, 5, 5)), **where),
    "cross_attention": lambda **where: plot.cross_attention(
        random_maps((1, 2, 3, 4)), 0, random_image(8, 8), **where
    ),
}


@pytest.mark.parametrize("name", SINGLE_PANEL + MULTI_PANEL)
def test_every_plot_draws_into_a_subfigure_and_returns_the_root_figure(name):
    root = Figure(layout="constrained")
    sub = root.subfigures(1, 2)[1]
    if name in SINGLE_PANEL:
        ax = sub.add_subplot()
        assert DRAW[name](ax=ax) is root
        assert ax.images or ax.collections
    else:
        assert DRAW[name](fig=sub) is root
        assert sub.axes and all(ax.get_figure() is sub for ax in sub.axes)
    assert rendered(root).startswith(b"\x89PNG")


# The colour rule of the module docstring: (function, colormap of its attention images).
COLOURS = {
    "head": plot.MATRIX_COLORMAP,
    "tokens": plot.MATRIX_COLORMAP,
    "heads": plot.MATRIX_COLORMAP,
    "cross_attention": plot.MATRIX_COLORMAP,
    "query": plot.OVERLAY_COLORMAP,
    "cls_attention": plot.OVERLAY_COLORMAP,
    "rollout": plot.OVERLAY_COLORMAP,
}


@pytest.mark.parametrize("name", sorted(COLOURS))
def test_colour_rule_matrix_viridis_overlay_inferno_never_smoothed(name):
    assert (plot.MATRIX_COLORMAP, plot.OVERLAY_COLORMAP) == ("viridis", "inferno")
    fig = DRAW[name]()
    # Attention images: every image on the figure except drawn photos (RGB, no colormap).
    images = [image for ax in fig.axes for image in ax.images if image.get_array().ndim == 2]
    assert images
    for image in images:
        if name == "query" and image is fig.axes[0].images[0]:
            continue  # the blank grid under the query outline, not attention
        assert image.get_cmap().name == COLOURS[name]
        assert image.get_interpolation() == "nearest"


def test_overlays_upsample_bilinear_by_default_like_torch():
    torch = pytest.importorskip("torch")
    rollout = random_maps((1 + 6, 1 + 6))
    heat = rollout[0, 1:].reshape(2, 3)
    fig = plot.rollout(rollout, random_image(20, 30), grid_size=(2, 3))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(heat)[None, None], size=(20, 30), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(fig.axes[0].images[1].get_array(), expected, atol=1e-12)


# ---------------------------------------------------------------- geometry


def test_geometry_gives_grid_prefix_and_normalization_at_once():
    geometry = analysis.ImageGeometry(
        grid_size=(2, 3), num_prefix_tokens=5, mean=plot.IMAGENET_MEAN, std=plot.IMAGENET_STD
    )
    attn = random_maps((2, 4, 5 + 6, 5 + 6))
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(3).random((20, 30, 3))
    model_input = torch.from_numpy(
        ((image - geometry.mean) / np.array(geometry.std)).transpose(2, 0, 1)
    )
    explicit = dict(
        grid_size=(2, 3), num_prefix_tokens=5, mean=plot.IMAGENET_MEAN, std=plot.IMAGENET_STD
    )
    for draw in (
        lambda **kw: plot.query(attn, (1, 2), model_input, show_cls=True, **kw),
        lambda **kw: plot.cls_attention(attn, model_input, **kw),
        lambda **kw: plot.rollout(random_maps((11, 11)), model_input, **kw),
    ):
        by_geometry, by_hand = draw(geometry=geometry), draw(**explicit)
        for got, want in zip(by_geometry.axes, by_hand.axes):
            assert len(got.images) == len(want.images)
            for got_image, want_image in zip(got.images, want.images):
                np.testing.assert_array_equal(got_image.get_array(), want_image.get_array())
        # The drawn photo is the image the model saw: normalization undone.
        np.testing.assert_allclose(by_geometry.axes[0].images[0].get_array(), image, atol=1e-12)


def test_geometry_and_a_different_explicit_value_is_an_error():
    geometry = analysis.ImageGeometry(grid_size=(2, 3), num_prefix_tokens=5)
    attn = random_maps((4, 11, 11))
    with pytest.raises(
        VisualizerError,
        match=r"plot.query: num_prefix_tokens=1 conflicts with geometry.num_prefix_tokens=5",
    ):
        plot.query(attn, 0, geometry=geometry, num_prefix_tokens=1)
    with pytest.raises(VisualizerError, match=r"plot.cls_attention: grid_size=\(3, 2\) conflicts"):
        plot.cls_attention(attn, geometry=geometry, grid_size=(3, 2))
    # Equal values are no conflict.
    plot.rollout(random_maps((11, 11)), geometry=geometry, grid_size=(2, 3), num_prefix_tokens=5)


def test_cross_attention_geometry_has_no_prefix_tokens():
    cross = random_maps((1, 2, 4, 6))
    image = random_image(20, 30)
    grid = analysis.ImageGeometry(grid_size=(2, 3), num_prefix_tokens=0, patch_size=10)
    fig = plot.cross_attention(cross, 1, image, geometry=grid)
    expected = cross[0, :, 1].mean(axis=0).reshape(2, 3)
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), expected)
    with pytest.raises(VisualizerError, match="geometry.num_prefix_tokens=1: pass ImageGeometry"):
        plot.cross_attention(cross, 1, image, geometry=analysis.ImageGeometry((2, 3)))

"""Matplotlib figures of attention maps.

Every function takes numpy arrays or torch tensors (CPU or CUDA, any float
dtype, with or without grad), draws into new or given axes, and returns the
``matplotlib.figure.Figure`` (the root figure, also when drawing into a
subfigure). Nothing here calls ``pyplot.show()`` or touches pyplot's global
state: figures are built with ``matplotlib.figure.Figure``, so they work
headless and are not kept alive by pyplot. In Jupyter, return the figure from
a cell to display it (with the inline backend active: run ``%matplotlib
inline`` or import pyplot first); elsewhere use ``fig.savefig(...)``.

One grammar: short names, and where to draw. A function that draws one panel
(:func:`head`, :func:`tokens`, :func:`head_view`, :func:`mean_attention_distance`,
:func:`rollout`) takes ``ax=``; one that draws several (:func:`heads`,
:func:`query`, :func:`cls_attention`, :func:`cross_attention`) takes ``fig=``
(a Figure or a SubFigure). The older names (``plot_head``, ``plot_heads``,
``plot_query_attention``, ``plot_cls_attention``,
``plot_mean_attention_distance``, ``plot_cross_attention``, ``plot_rollout``)
are the same functions.

Colours, one rule: attention read as a matrix (query x key, or a map drawn on
its own grid beside an image) uses :data:`MATRIX_COLORMAP` ("viridis"); a map
drawn over the image the model saw uses :data:`OVERLAY_COLORMAP` ("inferno",
dark where attention is low, so the attended part of the image stands out),
with or without the image. Both are perceptually uniform and readable in grey.
Every map is drawn cell for cell (``interpolation="nearest"``): matplotlib
never smooths one token into its neighbours. The only smoothing is the
upsampling of an overlay to the image's pixels, ``mode=OVERLAY_UPSAMPLING``
("bilinear"; pass ``mode="nearest"`` for flat patches, as DINO draws them).
Lines of a head view take one colour per head from :data:`HEAD_COLORS` ("tab10").

Overlays register attention with the image the model saw: pass the input
tensor itself (``(B, 3, H, W)``, ``(3, H, W)``) with ``mean=IMAGENET_MEAN,
std=IMAGENET_STD`` to undo the normalization, or an ``(H, W, 3)`` array of the
resized/cropped image. ``geometry=`` (an :class:`~visualizer.analysis.ImageGeometry`,
e.g. ``ImageGeometry.from_model(model)``) gives the grid, prefix tokens and
normalization at once. Image-space axes use pixel edges as coordinates
(``extent=(0, W, H, 0)``): the patch in grid row ``r``, column ``c`` covers
``x in [c * W / w, (c + 1) * W / w]``, ``y in [r * H / h, (r + 1) * H / h]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import Colormap, ListedColormap, to_rgba
from matplotlib.figure import Figure, SubFigure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ._arrays import (
    ArrayOrTensor,
    attention_array,
    check_bool,
    check_choice,
    check_index,
    check_number,
    cross_attention_array,
    grid_shape,
    image_pixels,
    index_list,
    positive_int,
    sequence_of,
    to_numpy,
)
from ._errors import VisualizerError
from .analysis import find_artifact_tokens, rollout_cls_attention
from .analysis import cls_attention as _cls_attention  # `cls_attention` is the plot below
from .analysis import threshold_mask, upsample_to_image
from .geometry import ImageGeometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The colour rule of the module docstring, in one place.
MATRIX_COLORMAP = "viridis"
OVERLAY_COLORMAP = "inferno"
OVERLAY_UPSAMPLING = "bilinear"
HEAD_COLORS = "tab10"

_MASK_COLORMAP = ListedColormap(["cyan"])

# Where a function draws: a Figure or a SubFigure of one.
FigureLike = Union[Figure, SubFigure]
GridSize = Union[int, Tuple[int, int], None]
TokenLabels = Sequence[Any]


def _root(figure: FigureLike) -> Figure:
    """The figure that saves and displays: ``figure`` or, for a SubFigure, its root."""
    return figure if isinstance(figure, Figure) else figure.figure


def _check_colormap(cmap: Union[str, Colormap], func: str) -> None:
    if not (isinstance(cmap, Colormap) or (isinstance(cmap, str) and cmap in matplotlib.colormaps)):
        raise VisualizerError(
            f"{func}: cmap must be a matplotlib colormap or its name (e.g. {MATRIX_COLORMAP!r}); "
            f"got {cmap!r}"
        )


def _check_overlay(mode: str, alpha: float, cmap: Union[str, Colormap], func: str) -> None:
    """Refuse bad drawing options of a map over an image before anything is drawn."""
    check_choice(mode, ("nearest", "bilinear"), func, "mode")
    check_number(alpha, func, "alpha", 0, 1)
    _check_colormap(cmap, func)


def _check_figure(fig: Optional[FigureLike], func: str) -> None:
    if fig is not None and not isinstance(fig, (Figure, SubFigure)):
        raise VisualizerError(
            f"{func}: fig must be a matplotlib Figure or SubFigure, or None; got "
            f"{type(fig).__name__}"
        )


def _single_axes(
    ax: Optional[Axes], figsize: Tuple[float, float], func: str
) -> Tuple[FigureLike, Axes]:
    """The figure and axes to draw one panel in: the caller's, or new ones."""
    if ax is not None and not isinstance(ax, Axes):
        raise VisualizerError(
            f"{func}: ax must be a matplotlib Axes or None; got {type(ax).__name__}"
        )
    if ax is None:
        figure = Figure(figsize=figsize, layout="constrained")
        return figure, figure.add_subplot()
    return ax.figure, ax


def _panel_grid(
    fig: Optional[FigureLike], count: int, ncols: int, func: str, panel_size: float = 3.0
) -> Tuple[FigureLike, List[Axes]]:
    """``count`` axes in rows of ``ncols`` on ``fig`` (new if None); unused slots removed."""
    _check_figure(fig, func)
    ncols = min(positive_int(ncols, func, "ncols"), count)
    nrows = math.ceil(count / ncols)
    if fig is None:
        fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.6), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for unused in axes[count:]:
        unused.remove()
    return fig, axes[:count]


def _label(*parts: str) -> str:
    """Join the non-empty parts of a title."""
    return ", ".join(part for part in parts if part)


def _context(layer: Optional[int], batch_index: int, batch_size: int) -> Tuple[str, str]:
    """Title parts naming the layer and, for a batch, the item."""
    return (
        f"layer {layer}" if layer is not None else "",
        f"item {batch_index % batch_size}" if batch_size > 1 else "",
    )


def _display_image(
    image: Optional[ArrayOrTensor],
    batch_index: int,
    mean: Optional[Tuple[float, ...]],
    std: Optional[Tuple[float, ...]],
    func: str,
) -> Optional[np.ndarray]:
    """The image the model saw as float ``(height, width, 3)`` in ``[0, 1]``, or None."""
    return None if image is None else image_pixels(image, batch_index, mean, std, func)


def _warn_if_unregistered(
    image: Optional[np.ndarray], grid: Tuple[int, int], func: str
) -> None:
    """Warn when the image cannot be the one the model saw: its aspect differs from the grid's."""
    if image is None:
        return
    image_height, image_width = image.shape[:2]
    patch_aspect = (image_height / grid[0]) / (image_width / grid[1])
    if not 0.9 <= patch_aspect <= 1.1:
        warnings.warn(
            f"{func}: the image is {image_height}x{image_width} pixels but the patch grid is "
            f"{grid[0]}x{grid[1]}, so patches would be {image_height / grid[0]:.1f}x"
            f"{image_width / grid[1]:.1f} pixels; pass the image the model saw (after "
            "resize/crop), e.g. the input tensor with mean=/std=",
            stacklevel=3,
        )


def _overlay(
    ax: Axes,
    image: Optional[np.ndarray],
    heat: np.ndarray,
    mode: str,
    alpha: float,
    cmap: str,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
) -> AxesImage:
    """Draw ``image`` (if any) and ``heat`` ``(h, w)`` resized over it; return the heat image."""
    size = image.shape[:2] if image is not None else heat.shape
    extent = (0, size[1], size[0], 0)
    if image is not None:
        ax.imshow(image, extent=extent)
    shown = ax.imshow(
        upsample_to_image(heat, (size[0], size[1]), mode),
        extent=extent,
        cmap=cmap,
        alpha=alpha if image is not None else None,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",  # already at the image's pixels: never smooth again
    )
    ax.set_axis_off()
    return shown


def _outline_patch(
    ax: Axes,
    row: int,
    col: int,
    grid: Tuple[int, int],
    size: Tuple[int, int],
    color: str = "red",
) -> None:
    """Outline grid cell ``(row, col)`` in pixel coordinates of an image of ``size``."""
    cell_height, cell_width = size[0] / grid[0], size[1] / grid[1]
    ax.add_patch(
        Rectangle(
            (col * cell_width, row * cell_height),
            cell_width,
            cell_height,
            fill=False,
            edgecolor=color,
            linewidth=2,
        )
    )


def _image_layout(
    func: str,
    geometry: Optional[ImageGeometry],
    grid_size: GridSize,
    num_prefix_tokens: Optional[int],
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
) -> ImageGeometry:
    """The geometry of a plot over an image: `geometry=` filled in and checked against the
    plot's own grid, prefix and normalisation arguments (see `ImageGeometry.resolve`)."""
    return ImageGeometry.resolve(
        geometry, caller=func, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens,
        mean=mean, std=std,
    )


def _map_item(
    attn: ArrayOrTensor, batch_index: int, func: str, square: bool = True
) -> Tuple[np.ndarray, int]:
    """One batch item of a map, ``(H, Q, N)``, with the batch size."""
    array, _ = attention_array(attn, func, square=square)
    return array[check_index(batch_index, array.shape[0], func, "batch_index")], array.shape[0]


# ------------------------------------------------------------------ matrices


def head(
    attn: ArrayOrTensor,
    head: int = 0,
    *,
    batch_index: int = 0,
    layer: Optional[int] = None,
    ax: Optional[Axes] = None,
    cmap: str = MATRIX_COLORMAP,
) -> Figure:
    """One head's full map (query rows, key columns) as a heatmap with a colorbar.

    Args:
        attn: attention map ``(B, H, Q, K)`` or ``(H, Q, K)``.
        head: head index.
        batch_index: batch item to draw.
        layer: layer number for the title (display only).
        ax: axes to draw in; None makes a new figure.
        cmap: matplotlib colormap.

    Returns:
        the Figure.

    Example:
        >>> import numpy as np
        >>> fig = head(np.full((2, 5, 5), 0.2), head=1, layer=3)
        >>> fig.axes[0].get_title()
        'layer 3, head 1'
    """
    func = "plot.head"
    _check_colormap(cmap, func)
    item, batch_size = _map_item(attn, batch_index, func, square=False)
    index = check_index(head, item.shape[0], func, "head")
    fig, ax = _single_axes(ax, (5.5, 4.5), func)
    shown = ax.imshow(item[index], cmap=cmap, interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    layer_part, item_part = _context(layer, batch_index, batch_size)
    ax.set_title(_label(layer_part, f"head {index}", item_part))
    return _root(fig)


def heads(
    attn: ArrayOrTensor,
    *,
    batch_index: int = 0,
    layer: Optional[int] = None,
    ncols: int = 4,
    fig: Optional[FigureLike] = None,
    cmap: str = MATRIX_COLORMAP,
) -> Figure:
    """Every head of one layer in a grid, followed by the average over heads.

    Args:
        attn: attention map ``(B, H, Q, K)`` or ``(H, Q, K)``.
        batch_index: batch item to draw.
        layer: layer number for the title (display only).
        ncols: panels per row.
        fig: figure (or subfigure) to draw in; None makes a new one.
        cmap: matplotlib colormap.

    Returns:
        the Figure, with ``H + 1`` axes: heads in order, then the mean.

    Example:
        >>> import numpy as np
        >>> len(heads(np.full((3, 4, 4), 0.25)).axes)
        4
    """
    func = "plot.heads"
    _check_colormap(cmap, func)
    item, batch_size = _map_item(attn, batch_index, func, square=False)
    count = item.shape[0]
    fig, axes = _panel_grid(fig, count + 1, ncols, func)
    for index, (ax, values) in enumerate(zip(axes, [*item, item.mean(axis=0)])):
        ax.imshow(values, cmap=cmap, interpolation="nearest")
        ax.set_title(f"head {index}" if index < count else "mean of heads")
        ax.set_axis_off()
    fig.suptitle(_label(*_context(layer, batch_index, batch_size)) or "attention heads")
    return _root(fig)


# ------------------------------------------------------------- text tokens


def _token_labels(labels: Any, count: int, func: str, name: str, axis: str) -> List[str]:
    """``labels`` as ``count`` strings, one per query row or key column."""
    if (
        isinstance(labels, (str, bytes))
        or not isinstance(labels, Iterable)
        or (isinstance(labels, np.ndarray) and labels.ndim == 0)
    ):
        raise VisualizerError(
            f"{func}: {name} must be a sequence of token strings, one per {axis}; got "
            f"{type(labels).__name__}"
        )
    strings = [str(label) for label in labels]
    if len(strings) != count:
        raise VisualizerError(
            f"{func}: {name} must hold one label per {axis} of attn ({count}); got {len(strings)}"
        )
    return strings


def _hidden_positions(
    hide_tokens: Any, query_labels: List[str], key_labels: List[str], same: bool, func: str
) -> Tuple[set, set]:
    """Query rows and key columns to leave out: ``(rows, columns)``.

    A string hides every query and key with that label; an int hides that key
    position and, when the queries are the keys (``same``), that query too.
    """
    if hide_tokens is None:
        return set(), set()
    rows: set = set()
    columns: set = set()
    expected = "token strings or int positions"
    for token in sequence_of(hide_tokens, (str, int, np.integer), func, "hide_tokens", expected):
        if isinstance(token, str):
            found_rows = {index for index, label in enumerate(query_labels) if label == token}
            found_columns = {index for index, label in enumerate(key_labels) if label == token}
            if not found_rows and not found_columns:
                raise VisualizerError(
                    f"{func}: hide_tokens names {token!r}, which is not among the tokens"
                )
            rows |= found_rows
            columns |= found_columns
        elif isinstance(token, (int, np.integer)) and not isinstance(token, bool):
            position = check_index(token, len(key_labels), func, "hide_tokens position")
            columns.add(position)
            if same:
                rows.add(position)
        else:
            raise VisualizerError(
                f"{func}: hide_tokens must hold token strings or int positions; got {token!r}"
            )
    return rows, columns


def _token_view(
    attn: ArrayOrTensor,
    tokens: TokenLabels,
    query_tokens: Optional[TokenLabels],
    hide_tokens: Any,
    batch_index: int,
    func: str,
) -> Tuple[np.ndarray, List[str], List[str], int]:
    """``(maps (H, Q', K'), query labels, key labels, batch size)`` with hidden tokens left out."""
    item, batch_size = _map_item(attn, batch_index, func, square=False)
    num_queries, num_keys = item.shape[-2:]
    key_labels = _token_labels(tokens, num_keys, func, "tokens", "key column")
    if query_tokens is None:
        if num_queries != num_keys:
            raise VisualizerError(
                f"{func}: attn has {num_queries} query rows and {num_keys} key columns; tokens "
                "labels the keys, so pass query_tokens= with one label per query row"
            )
        query_labels = key_labels
    else:
        query_labels = _token_labels(query_tokens, num_queries, func, "query_tokens", "query row")
    hidden_rows, hidden_columns = _hidden_positions(
        hide_tokens, query_labels, key_labels, query_tokens is None, func
    )
    rows = [index for index in range(num_queries) if index not in hidden_rows]
    columns = [index for index in range(num_keys) if index not in hidden_columns]
    if not rows or not columns:
        raise VisualizerError(
            f"{func}: hide_tokens={hide_tokens!r} hides every "
            f"{'query' if not rows else 'key'} token; nothing is left to draw"
        )
    return (
        item[:, rows][:, :, columns],
        [query_labels[index] for index in rows],
        [key_labels[index] for index in columns],
        batch_size,
    )


def _token_figure_size(count: int) -> float:
    """A side in inches that gives each token label room, within reason."""
    return min(max(4.0, 0.28 * count + 2.0), 14.0)


def tokens(
    attn: ArrayOrTensor,
    tokens: TokenLabels,
    head: Optional[int] = None,
    *,
    batch_index: int = 0,
    query_tokens: Optional[TokenLabels] = None,
    hide_tokens: Any = None,
    layer: Optional[int] = None,
    ax: Optional[Axes] = None,
    cmap: str = MATRIX_COLORMAP,
) -> Figure:
    """A text model's attention as a heatmap labelled with its tokens: query rows, key columns.

    Args:
        attn: attention map ``(B, H, Q, K)`` or ``(H, Q, K)``.
        tokens: ``K`` token strings (e.g. ``tokenizer.convert_ids_to_tokens(ids)``),
            labelling the keys and, when ``Q == K``, the queries.
        head: head index, or None for the mean over heads.
        batch_index: batch item to draw.
        query_tokens: ``Q`` labels for the queries when they are not the keys
            (a generation step ``(B, H, 1, K)``, cross-attention).
        hide_tokens: tokens to leave out, e.g. ``["[CLS]", "[SEP]"]`` (every
            token with that string) or positions ``[0, -1]``. Their rows and
            columns are removed; the remaining weights are not renormalized.
        layer: layer number for the title (display only).
        ax: axes to draw in; None makes a new figure.
        cmap: matplotlib colormap.

    Returns:
        the Figure: the axes' image is the drawn ``(Q', K')`` matrix, its x/y
        tick labels the key/query tokens.

    Example:
        >>> import numpy as np
        >>> fig = tokens(np.full((2, 3, 3), 1 / 3), ["[CLS]", "hi", "[SEP]"], hide_tokens=["[CLS]"])
        >>> [label.get_text() for label in fig.axes[0].get_xticklabels()]
        ['hi', '[SEP]']
    """
    func = "plot.tokens"
    _check_colormap(cmap, func)
    item, query_labels, key_labels, batch_size = _token_view(
        attn, tokens, query_tokens, hide_tokens, batch_index, func
    )
    if head is None:
        values, head_part = item.mean(axis=0), "mean of heads"
    else:
        index = check_index(head, item.shape[0], func, "head")
        values, head_part = item[index], f"head {index}"
    width = _token_figure_size(len(key_labels))
    height = _token_figure_size(len(query_labels))
    fig, ax = _single_axes(ax, (width + 1.0, height), func)
    shown = ax.imshow(values, cmap=cmap, interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    ax.set_xticks(range(len(key_labels)), key_labels, rotation=90)
    ax.set_yticks(range(len(query_labels)), query_labels)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    layer_part, item_part = _context(layer, batch_index, batch_size)
    ax.set_title(_label(layer_part, head_part, item_part))
    return _root(fig)


def _head_color(index: int, count: int) -> Tuple[float, float, float, float]:
    """Head ``index``'s colour: fixed per index, so a head keeps its colour in every figure."""
    palette = matplotlib.colormaps[HEAD_COLORS if count <= 10 else "tab20"]
    colors = getattr(palette, "colors", None) or [palette(0)]
    return to_rgba(colors[index % len(colors)])


def _column_positions(count: int, other: int) -> np.ndarray:
    """Row positions of ``count`` labels, centred against a column of ``other``."""
    return np.arange(count) + (max(count, other) - count) / 2


def head_view(
    attn: ArrayOrTensor,
    tokens: TokenLabels,
    heads: Union[int, Sequence[int], None] = None,
    *,
    batch_index: int = 0,
    query_tokens: Optional[TokenLabels] = None,
    hide_tokens: Any = None,
    renormalize: bool = False,
    layer: Optional[int] = None,
    linewidth: float = 4.0,
    ax: Optional[Axes] = None,
) -> Figure:
    """A static head view in BertViz's manner: a line from each query token to each key token.

    Query tokens stand in the left column, key tokens in the right one; the
    line from query ``q`` to key ``k`` of head ``h`` has head ``h``'s colour
    (:data:`HEAD_COLORS`), opacity equal to the weight ``attn[h, q, k]`` and
    width ``linewidth * attn[h, q, k]``. The weights are probabilities in
    ``[0, 1]``, so they are drawn as they are, not rescaled: a faint line is a
    small weight. Heads are drawn over each other in order. Fit for a paper:
    one axes, vector output with ``savefig("view.pdf")``.

    Args:
        attn: attention map ``(B, H, Q, K)`` or ``(H, Q, K)``.
        tokens: ``K`` token strings, labelling the keys and, when ``Q == K``,
            the queries.
        heads: a head index or a sequence of them; None draws every head.
        batch_index: batch item to draw.
        query_tokens: ``Q`` labels for the queries when they are not the keys.
        hide_tokens: tokens to leave out, e.g. ``["[CLS]", "[SEP]"]`` (every
            token with that string) or positions ``[0, -1]``: no label, no line.
        renormalize: divide each query's drawn weights by their sum, so they
            show how the query shares the attention it gives to the tokens
            still shown (after ``hide_tokens``); False draws the model's weights.
        layer: layer number for the title (display only).
        linewidth: width in points of a line of weight 1.
        ax: axes to draw in; None makes a new figure.

    Returns:
        the Figure. The axes hold one ``LineCollection`` per drawn head (label
        ``"head h"``), its segments ``((0, y_query), (1, y_key))`` query-major;
        the query tokens are the axes' y tick labels, the key tokens those of
        its secondary axis on the right (``ax.child_axes[0]``).

    Example:
        >>> import numpy as np
        >>> attn = np.array([[[0.0, 1.0], [0.25, 0.75]]])  # (H=1, Q=2, K=2)
        >>> fig = head_view(attn, ["a", "b"])
        >>> fig.axes[0].collections[0].get_colors()[:, 3]  # opacity = weight
        array([0.  , 1.  , 0.25, 0.75])
    """
    func = "plot.head_view"
    check_bool(renormalize, func, "renormalize")
    check_number(linewidth, func, "linewidth", 0, low_open=True)
    item, query_labels, key_labels, batch_size = _token_view(
        attn, tokens, query_tokens, hide_tokens, batch_index, func
    )
    count = item.shape[0]
    selected = (
        list(range(count)) if heads is None else index_list(heads, count, func, "heads", "head")
    )

    rows = max(len(query_labels), len(key_labels))
    query_y = _column_positions(len(query_labels), len(key_labels))
    key_y = _column_positions(len(key_labels), len(query_labels))
    # Segment (q, k) at index q * K' + k: query-major, as the weights ravel.
    starts = np.repeat(query_y, len(key_y))
    ends = np.tile(key_y, len(query_y))
    segments = np.stack(
        [np.stack([np.zeros_like(starts), starts], -1), np.stack([np.ones_like(ends), ends], -1)],
        axis=1,
    )
    fig, ax = _single_axes(ax, (4.5, _token_figure_size(rows)), func)
    for index in selected:
        weights = item[index].astype(np.float64)
        if renormalize:
            sums = weights.sum(axis=-1, keepdims=True)
            weights = np.divide(weights, sums, out=np.zeros_like(weights), where=sums > 0)
        # float16 rows may sum a little above 1; opacity must stay within [0, 1].
        strength = np.clip(weights, 0.0, 1.0).ravel()
        colors = np.tile(_head_color(index, count), (strength.size, 1))
        colors[:, 3] = strength
        ax.add_collection(
            LineCollection(
                list(segments),
                colors=colors,
                linewidths=linewidth * strength,
                label=f"head {index}",
                capstyle="round",
            )
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(rows - 0.5, -0.5)  # first token on top
    ax.set_xticks([])
    ax.set_yticks(query_y, query_labels)
    ax.tick_params(length=0)
    keys_axis = ax.secondary_yaxis("right")
    keys_axis.set_yticks(key_y, key_labels)
    keys_axis.tick_params(length=0)
    for spine in [*ax.spines.values(), *keys_axis.spines.values()]:
        spine.set_visible(False)
    if len(selected) > 1:
        handles = [
            Line2D([], [], color=_head_color(index, count), linewidth=2, label=f"head {index}")
            for index in selected
        ]
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncols=min(len(handles), 4),
            frameon=False,
            fontsize="small",
        )
    heads_part = f"head {selected[0]}" if len(selected) == 1 else f"{len(selected)} heads"
    layer_part, item_part = _context(layer, batch_index, batch_size)
    ax.set_title(_label(layer_part, heads_part, item_part))
    return _root(fig)


# -------------------------------------------------------------- over images


def _query_cell(
    query: Any, grid: Tuple[int, int], num_prefix_tokens: int, func: str
) -> Tuple[int, int]:
    """``(row, col)`` of a query given as ``(row, col)`` or a flat patch index."""
    on_grid = (
        f"(on the patch grid_size={grid} of attn after num_prefix_tokens={num_prefix_tokens})"
    )
    if isinstance(query, (int, np.integer)):
        row, col = divmod(check_index(query, grid[0] * grid[1], func, f"query {on_grid}"), grid[1])
        return row, col
    try:
        row, col = query
    except (TypeError, ValueError):
        raise VisualizerError(
            f"{func}: query must be a patch index or (row, col); got {query!r}"
        ) from None
    return check_index(row, grid[0], func, f"query row {on_grid}"), check_index(
        col, grid[1], func, f"query col {on_grid}"
    )


def query(
    attn: ArrayOrTensor,
    query: Union[int, Tuple[int, int]],
    image: Optional[ArrayOrTensor] = None,
    *,
    grid_size: GridSize = None,
    num_prefix_tokens: Optional[int] = None,
    head: Optional[int] = None,
    batch_index: int = 0,
    show_cls: bool = False,
    layer: Optional[int] = None,
    mode: str = OVERLAY_UPSAMPLING,
    alpha: float = 0.6,
    cmap: str = OVERLAY_COLORMAP,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    geometry: Optional[ImageGeometry] = None,
    fig: Optional[FigureLike] = None,
) -> Figure:
    """One query patch's attention over the image, the query patch outlined.

    Left: the image with the query patch outlined. Right: the same with the
    query's attention over the patches overlaid. With ``show_cls=True`` a third
    panel shows the weight the query gives to CLS (and register tokens) on the
    same colour scale, as the original Visualizer's ``grid_to_grid_with_cls``.

    Args:
        attn: attention map ``(B, H, N, N)`` or ``(H, N, N)``.
        query: query patch as ``(row, col)`` on the grid or a flat patch index
            (prefix tokens not counted).
        image: the image the model saw (see module docstring), or None to draw
            on the patch grid alone (then coordinates are in patches).
        grid_size: patch grid ``(h, w)``; None infers a square grid.
        num_prefix_tokens: CLS plus register tokens before the patches; None: 1.
        head: head index, or None for the mean over heads.
        batch_index: batch item to draw (of the map and of a batched image).
        show_cls: add the panel with the prefix tokens' weights.
        layer: layer number for the title (display only).
        mode: ``"bilinear"`` or ``"nearest"`` upsampling to the image.
        alpha: opacity of the attention over the image.
        cmap: matplotlib colormap.
        mean, std: per-channel normalization to undo on the image.
        geometry: an :class:`~visualizer.analysis.ImageGeometry` instead of
            ``grid_size``, ``num_prefix_tokens``, ``mean`` and ``std``.
        fig: figure (or subfigure) to draw in; None makes a new one.

    Returns:
        the Figure: axes ``[image, overlay]`` plus ``[prefix weights]`` with
        ``show_cls``.

    Example:
        >>> import numpy as np
        >>> fig = query(np.full((2, 5, 5), 0.2), (1, 0), grid_size=(2, 2))
        >>> fig.axes[0].patches[0].get_xy()
        (0.0, 1.0)
    """
    func = "plot.query"
    _check_overlay(mode, alpha, cmap, func)
    check_bool(show_cls, func, "show_cls")
    _check_figure(fig, func)
    layout = _image_layout(func, geometry, grid_size, num_prefix_tokens, mean, std)
    prefix_count = layout.num_prefix_tokens
    item, batch_size = _map_item(attn, batch_index, func)
    grid = grid_shape(item.shape[-1], prefix_count, layout.grid_size, func, "attn")
    if show_cls and prefix_count < 1:
        raise VisualizerError(
            f"{func}: show_cls needs a CLS token (num_prefix_tokens >= 1); got {prefix_count!r}"
        )
    row, col = _query_cell(query, grid, prefix_count, func)
    # Patch tokens follow the prefix tokens in row-major order.
    token = prefix_count + row * grid[1] + col
    if head is None:
        weights, head_part = item[:, token].mean(axis=0), "mean of heads"
    else:
        index = check_index(head, item.shape[0], func, "head")
        weights, head_part = item[index, token], f"head {index}"
    heat = weights[prefix_count:].reshape(grid)
    prefix = weights[:prefix_count]
    picture = _display_image(image, batch_index, layout.mean, layout.std, func)
    _warn_if_unregistered(picture, grid, func)
    size = (picture.shape[0], picture.shape[1]) if picture is not None else grid

    if fig is None:
        fig = Figure(figsize=(9.5 if show_cls else 8.5, 4.5), layout="constrained")
    ratios = [1, 1, 0.25] if show_cls else [1, 1]
    axes = fig.subplots(1, len(ratios), width_ratios=ratios)
    # CLS and the patches share one colour scale so their weights compare.
    vmin, vmax = (
        (min(heat.min(), prefix.min()), max(heat.max(), prefix.max())) if show_cls else (None, None)
    )

    if picture is not None:
        axes[0].imshow(picture, extent=(0, size[1], size[0], 0))
    else:
        axes[0].imshow(np.zeros(grid), extent=(0, size[1], size[0], 0), cmap="gray")
    axes[0].set_axis_off()
    axes[0].set_title(f"query patch (row {row}, col {col})")
    _overlay(axes[1], picture, heat, mode, alpha, cmap, vmin, vmax)
    axes[1].set_title(head_part)
    for ax in axes[:2]:
        _outline_patch(ax, row, col, grid, size)
    if show_cls:
        axes[2].imshow(prefix[:, None], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[2].set_xticks([])
        axes[2].set_yticks(
            range(prefix_count),
            ["CLS"] + [f"reg {index}" for index in range(1, prefix_count)],
        )
        axes[2].set_title(f"CLS {prefix[0]:.3f}")
    fig.suptitle(_label(f"attention of token {token}", *_context(layer, batch_index, batch_size)))
    return _root(fig)


def _artifact_list(
    mask_artifacts: Union[bool, Sequence[int], None],
    item: np.ndarray,
    num_prefix_tokens: int,
    func: str,
) -> List[int]:
    """Token indices to zero: detected (True), given (a sequence) or none (False/None)."""
    if mask_artifacts is True:
        found = find_artifact_tokens(item, num_prefix_tokens)  # unbatched: one array
        return [int(token) for token in np.asarray(found)]
    if mask_artifacts is False or mask_artifacts is None:
        return []
    count = item.shape[-1]
    try:
        given = [int(token) for token in mask_artifacts]
    except (TypeError, ValueError):
        raise VisualizerError(
            f"{func}: mask_artifacts must be a bool or a sequence of token indices; got "
            f"{mask_artifacts!r}"
        ) from None
    for token in given:
        if not num_prefix_tokens <= token < count:
            raise VisualizerError(
                f"{func}: mask_artifacts must hold patch token indices in [{num_prefix_tokens}, "
                f"{count}); got {token}"
            )
    return given


def cls_attention(
    attn: ArrayOrTensor,
    image: Optional[ArrayOrTensor] = None,
    *,
    grid_size: GridSize = None,
    num_prefix_tokens: Optional[int] = None,
    batch_index: int = 0,
    heads: Optional[Sequence[int]] = None,
    mode: str = OVERLAY_UPSAMPLING,
    threshold: Optional[float] = None,
    mask_artifacts: Union[bool, Sequence[int], None] = False,
    layer: Optional[int] = None,
    alpha: float = 0.6,
    cmap: str = OVERLAY_COLORMAP,
    ncols: int = 4,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    geometry: Optional[ImageGeometry] = None,
    fig: Optional[FigureLike] = None,
) -> Figure:
    """CLS attention per head over the image, plus the head mean (DINO's ``visualize_attention``).

    Args:
        attn: attention map ``(B, H, N, N)`` or ``(H, N, N)`` (usually the last
            layer), or its CLS row ``(B, H, 1, N)``.
        image: the image the model saw (see module docstring), or None to draw
            on the patch grid.
        grid_size: patch grid ``(h, w)``; None infers a square grid.
        num_prefix_tokens: CLS plus register tokens before the patches; None: 1.
        batch_index: batch item to draw (of the map and of a batched image).
        heads: head indices to draw; None draws all.
        mode: ``"bilinear"`` or ``"nearest"`` (DINO's flat patches) upsampling
            to the image.
        threshold: if set, a fraction in ``(0, 1]``: shade DINO's mask, the
            fewest patches holding that share of each panel's attention.
        mask_artifacts: True zeros the tokens
            :func:`visualizer.analysis.find_artifact_tokens` reports for this
            item; a sequence zeros those token indices (full-token indexing, as
            in ``attentions[:, 283] = 0`` scripts). The title says which tokens
            were zeroed.
        layer: layer number for the title (display only).
        alpha: opacity of the attention over the image.
        cmap: matplotlib colormap.
        ncols: panels per row.
        mean, std: per-channel normalization to undo on the image.
        geometry: an :class:`~visualizer.analysis.ImageGeometry` instead of
            ``grid_size``, ``num_prefix_tokens``, ``mean`` and ``std``.
        fig: figure (or subfigure) to draw in; None makes a new one.

    Returns:
        the Figure: one axes per drawn head, then one for the mean over them.
        Each axes holds the image (if given), the attention, and the mask layer
        (if ``threshold``), in that order.

    Example:
        >>> import numpy as np
        >>> fig = cls_attention(np.full((2, 5, 5), 0.2), threshold=0.6)
        >>> [ax.get_title() for ax in fig.axes]
        ['head 0, 60% mass', 'head 1, 60% mass', 'mean of heads, 60% mass']
    """
    func = "plot.cls_attention"
    _check_overlay(mode, alpha, cmap, func)
    if threshold is not None:
        check_number(threshold, func, "threshold", 0, 1, low_open=True)
    layout = _image_layout(func, geometry, grid_size, num_prefix_tokens, mean, std)
    prefix_count = layout.num_prefix_tokens
    item, batch_size = _map_item(attn, batch_index, func, square=False)
    per_head = _cls_attention(item, geometry=layout)  # (H, h, w)
    artifacts = _artifact_list(mask_artifacts, item, prefix_count, func)
    if artifacts:
        per_head = per_head.copy()
        rows, cols = np.divmod(np.asarray(artifacts) - prefix_count, per_head.shape[-1])
        per_head[:, rows, cols] = 0.0
    selected = (
        list(range(per_head.shape[0]))
        if heads is None
        else index_list(heads, per_head.shape[0], func, "heads", "head")
    )
    panels = [per_head[index] for index in selected] + [per_head[selected].mean(axis=0)]
    titles = [f"head {index}" for index in selected] + ["mean of heads"]
    picture = _display_image(image, batch_index, layout.mean, layout.std, func)
    grid = (per_head.shape[-2], per_head.shape[-1])
    _warn_if_unregistered(picture, grid, func)
    size = (picture.shape[0], picture.shape[1]) if picture is not None else grid
    masks: List[Optional[np.ndarray]] = (
        list(threshold_mask(np.stack(panels), threshold))
        if threshold is not None
        else [None] * len(panels)
    )

    fig, axes = _panel_grid(fig, len(panels), ncols, func)
    for ax, heat, title, mask in zip(axes, panels, titles, masks):
        _overlay(ax, picture, heat, mode, alpha, cmap)
        if mask is not None:
            kept = upsample_to_image(mask.astype(np.float64), size, "nearest") > 0.5
            ax.imshow(
                np.ma.masked_where(~kept, kept),
                extent=(0, size[1], size[0], 0),
                cmap=_MASK_COLORMAP,
                alpha=0.35,
                interpolation="nearest",
            )
            title = f"{title}, {threshold:.0%} mass"
        ax.set_title(title)
    if artifacts:
        artifact_part = f"artifact tokens {artifacts} zeroed"
    else:
        artifact_part = "no artifact tokens found" if mask_artifacts is True else ""
    fig.suptitle(_label("CLS attention", *_context(layer, batch_index, batch_size), artifact_part))
    return _root(fig)


def mean_attention_distance(
    distances: ArrayOrTensor,
    *,
    ax: Optional[Axes] = None,
    title: str = "Mean attention distance",
) -> Figure:
    """Mean attention distance per head against layer depth (ViT paper, Figure 7).

    Args:
        distances: ``(L, H)`` pixels, from
            :func:`visualizer.analysis.mean_attention_distance` on a layer stack.
        ax: axes to draw in; None makes a new figure.
        title: axes title.

    Returns:
        the Figure: one scatter per head (label ``"head i"``), x = layer index.

    Example:
        >>> import numpy as np
        >>> fig = mean_attention_distance(np.array([[10.0, 50.0], [80.0, 90.0]]))
        >>> len(fig.axes[0].collections)
        2
    """
    func = "plot.mean_attention_distance"
    array = to_numpy(distances, func, "distances")
    if array.ndim != 2:
        raise VisualizerError(
            f"{func}: distances must have shape (L, H) (mean_attention_distance of a layer stack); "
            f"got shape {array.shape}"
        )
    fig, ax = _single_axes(ax, (6, 4.5), func)
    layers = np.arange(array.shape[0])
    for index in range(array.shape[1]):
        ax.scatter(layers, array[:, index], s=14, label=f"head {index}")
    ax.set_xticks(layers)  # whole layers, never fractional ticks
    # From zero, so differences are drawn to scale: an axis zoomed to the
    # data would make a 1 px spread look like a change of kind.
    ax.set_ylim(bottom=0)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title(title)
    if array.shape[1] <= 16:
        ax.legend(fontsize="x-small", ncols=2)
    return _root(fig)


def cross_attention(
    cross_attn: ArrayOrTensor,
    queries: Union[int, Sequence[int]],
    image: ArrayOrTensor,
    *,
    grid_size: GridSize = None,
    boxes: Optional[ArrayOrTensor] = None,
    batch_index: int = 0,
    per_head: bool = True,
    cmap: str = MATRIX_COLORMAP,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    geometry: Optional[ImageGeometry] = None,
    fig: Optional[FigureLike] = None,
) -> Figure:
    """DETR-style cross-attention: each object query's attention over the encoder feature map.

    One row per query: the image with the query's box, the attention averaged
    over heads, then each head's attention (if the map has heads and
    ``per_head``), each on the ``(h, w)`` feature grid beside the image (so in
    :data:`MATRIX_COLORMAP`).

    Args:
        cross_attn: ``(B, H, Q, h*w)``, or head-averaged ``(B, Q, h*w)``
            (``nn.MultiheadAttention`` with ``average_attn_weights=True``).
        queries: object query index or sequence of them.
        image: the image the model saw (see module docstring).
        grid_size: feature grid ``(h, w)``; None infers a square grid.
        boxes: pixel ``(x0, y0, x1, y1)`` per selected query, ``(len(queries), 4)``
            (see :func:`visualizer.analysis.box_cxcywh_to_xyxy`), or None.
        batch_index: batch item to draw (of the map and of a batched image).
        per_head: draw the per-head panels too.
        cmap: matplotlib colormap.
        mean, std: per-channel normalization to undo on the image.
        geometry: an :class:`~visualizer.analysis.ImageGeometry` of the
            feature grid (``num_prefix_tokens=0``) instead of ``grid_size``,
            ``mean`` and ``std``.
        fig: figure (or subfigure) to draw in; None makes a new one.

    Returns:
        the Figure: for each query, axes ``[image, mean of heads, head 0, ...]``.

    Example:
        >>> import numpy as np
        >>> cross = np.full((1, 8, 6), 1 / 6)  # (B, Q, h*w), head-averaged
        >>> fig = cross_attention(cross, [2, 5], np.zeros((20, 30, 3)), grid_size=(2, 3))
        >>> [ax.get_title() for ax in fig.axes]
        ['query 2', 'attention', 'query 5', 'attention']
    """
    func = "plot.cross_attention"
    check_bool(per_head, func, "per_head")
    _check_colormap(cmap, func)
    _check_figure(fig, func)
    if isinstance(geometry, ImageGeometry) and geometry.num_prefix_tokens != 0:
        raise VisualizerError(
            f"{func}: cross-attention keys are feature-map cells only, with no prefix tokens; "
            f"got geometry.num_prefix_tokens={geometry.num_prefix_tokens}: pass "
            "ImageGeometry(..., num_prefix_tokens=0)"
        )
    layout = ImageGeometry.resolve(
        geometry, caller=func, grid_size=grid_size, num_prefix_tokens=0, mean=mean, std=std
    )
    array = cross_attention_array(cross_attn, func)
    batch_size, count, num_queries, cells = array.shape
    item = array[check_index(batch_index, batch_size, func, "batch_index")]
    grid = grid_shape(cells, 0, layout.grid_size, func, "cross_attn")
    selected = index_list(queries, num_queries, func, "queries", "object query")
    box_array = None if boxes is None else to_numpy(boxes, func, "boxes")
    if box_array is not None:
        if box_array.shape[-1:] != (4,) or box_array.size != 4 * len(selected):
            raise VisualizerError(
                f"{func}: boxes must have shape ({len(selected)}, 4), one box per selected query; "
                f"got shape {box_array.shape}"
            )
        box_array = box_array.reshape(len(selected), 4)
    picture = _display_image(image, batch_index, layout.mean, layout.std, func)
    if picture is None:
        raise VisualizerError(
            f"{func}: image is required (the panel beside the attention); got None"
        )
    _warn_if_unregistered(picture, grid, func)
    extra_heads = count if per_head and count > 1 else 0
    ncols = 2 + extra_heads

    if fig is None:
        fig = Figure(figsize=(2.6 * ncols, 2.6 * len(selected) + 0.4), layout="constrained")
    axes = fig.subplots(len(selected), ncols, squeeze=False)
    size = picture.shape[:2]
    for row, index in enumerate(selected):
        image_ax = axes[row, 0]
        image_ax.imshow(picture, extent=(0, size[1], size[0], 0))
        image_ax.set_title(f"query {index}")
        image_ax.set_axis_off()
        if box_array is not None:
            x0, y0, x1, y1 = box_array[row]
            image_ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=2)
            )
        maps = [item[:, index].mean(axis=0)] + [
            item[head_index, index] for head_index in range(extra_heads)
        ]
        titles = ["mean of heads" if count > 1 else "attention"] + [
            f"head {head_index}" for head_index in range(extra_heads)
        ]
        for ax, values, title in zip(axes[row, 1:], maps, titles):
            ax.imshow(values.reshape(grid), cmap=cmap, interpolation="nearest")
            ax.set_title(title)
            ax.set_axis_off()
    return _root(fig)


def rollout(
    rollout: ArrayOrTensor,
    image: Optional[ArrayOrTensor] = None,
    *,
    grid_size: GridSize = None,
    num_prefix_tokens: Optional[int] = None,
    batch_index: int = 0,
    mode: str = OVERLAY_UPSAMPLING,
    alpha: float = 0.6,
    cmap: str = OVERLAY_COLORMAP,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    geometry: Optional[ImageGeometry] = None,
    title: str = "attention rollout (CLS)",
    ax: Optional[Axes] = None,
) -> Figure:
    """Attention rollout's CLS row overlaid on the image.

    Args:
        rollout: ``(B, N, N)`` or ``(N, N)`` from
            :func:`visualizer.analysis.attention_rollout` or
            :func:`visualizer.analysis.gradient_rollout`.
        image: the image the model saw (see module docstring), or None to draw
            on the patch grid.
        grid_size: patch grid ``(h, w)``; None infers a square grid.
        num_prefix_tokens: CLS plus register tokens before the patches; None: 1.
        batch_index: batch item to draw (of the rollout and of a batched image).
        mode: ``"bilinear"`` or ``"nearest"`` upsampling to the image.
        alpha: opacity of the rollout over the image.
        cmap: matplotlib colormap.
        mean, std: per-channel normalization to undo on the image.
        geometry: an :class:`~visualizer.analysis.ImageGeometry` instead of
            ``grid_size``, ``num_prefix_tokens``, ``mean`` and ``std``.
        title: axes title.
        ax: axes to draw in; None makes a new figure.

    Returns:
        the Figure.

    Example:
        >>> import numpy as np
        >>> fig = rollout(np.eye(5), grid_size=(2, 2))
        >>> fig.axes[0].images[0].get_array().shape
        (2, 2)
    """
    func = "plot.rollout"
    _check_overlay(mode, alpha, cmap, func)
    layout = _image_layout(func, geometry, grid_size, num_prefix_tokens, mean, std)
    heat = rollout_cls_attention(rollout, geometry=layout)
    if heat.ndim == 3:
        heat = heat[check_index(batch_index, heat.shape[0], func, "batch_index")]
    picture = _display_image(image, batch_index, layout.mean, layout.std, func)
    _warn_if_unregistered(picture, (heat.shape[0], heat.shape[1]), func)
    fig, ax = _single_axes(ax, (5, 5), func)
    _overlay(ax, picture, heat, mode, alpha, cmap)
    ax.set_title(title)
    return _root(fig)


# The names before the short ones: the very same functions, so code written for
# either spelling keeps working and `plot.plot_head is plot.head`.
plot_head = head
plot_heads = heads
plot_query_attention = query
plot_cls_attention = cls_attention
plot_mean_attention_distance = mean_attention_distance
plot_cross_attention = cross_attention
plot_rollout = rollout

"""Matplotlib figures of attention maps.

Every function takes numpy arrays or torch tensors (CPU or CUDA, any float
dtype, with or without grad), draws into new or given axes, and returns the
``matplotlib.figure.Figure``. Nothing here calls ``pyplot.show()`` or touches
pyplot's global state: figures are built with ``matplotlib.figure.Figure``, so
they work headless and are not kept alive by pyplot. In Jupyter, return the
figure from a cell to display it (with the inline backend active: run
``%matplotlib inline`` or import pyplot first); elsewhere use
``fig.savefig(...)``, or pass
``ax=``/``fig=`` made with ``pyplot.subplots()`` to draw into a window.

Overlays register attention with the image the model saw: pass the input
tensor itself (``(B, 3, H, W)``, ``(3, H, W)``) with ``mean=IMAGENET_MEAN,
std=IMAGENET_STD`` to undo the normalization, or an ``(H, W, 3)`` array of the
resized/cropped image. Image-space axes use pixel edges as coordinates
(``extent=(0, W, H, 0)``): the patch in grid row ``r``, column ``c`` covers
``x in [c * W / w, (c + 1) * W / w]``, ``y in [r * H / h, (r + 1) * H / h]``.
"""

import math
import warnings

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ._arrays import (
    attention_array,
    check_index,
    cross_attention_array,
    grid_shape,
    is_integer_data,
    is_torch_tensor,
    to_numpy,
)
from ._errors import VisualizerError
from .analysis import (
    cls_attention,
    find_artifact_tokens,
    rollout_cls_attention,
    threshold_mask,
    upsample_to_image,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MASK_COLORMAP = ListedColormap(["cyan"])


def _single_axes(ax, figsize):
    """The figure and axes to draw one panel in: the caller's, or new ones."""
    if ax is None:
        figure = Figure(figsize=figsize)
        return figure, figure.add_subplot()
    return ax.figure, ax


def _panel_grid(fig, count, ncols, panel_size=3.0):
    """``count`` axes in rows of ``ncols`` on ``fig`` (new if None); unused slots removed."""
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    if fig is None:
        fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for unused in axes[count:]:
        unused.remove()
    return fig, axes[:count]


def _label(*parts):
    """Join the non-empty parts of a title."""
    return ", ".join(part for part in parts if part)


def _context(layer, batch_index, batch_size):
    """Title parts naming the layer and, for a batch, the item."""
    return (
        f"layer {layer}" if layer is not None else "",
        f"item {batch_index % batch_size}" if batch_size > 1 else "",
    )


def _display_image(image, batch_index, mean, std, func):
    """The image the model saw as float ``(height, width, 3)`` in ``[0, 1]``, or None.

    Accepts ``(H, W)``, ``(H, W, C)``, ``(C, H, W)`` and batches of them
    (``batch_index`` picks the item). Integer images are read as 0-255.
    ``mean``/``std`` undo a ``Normalize`` transform. Float values still outside
    ``[0, 1]`` are stretched to it, so a normalized tensor passed without
    ``mean``/``std`` is at least recognisable.
    """
    if image is None:
        return None
    integer = is_integer_data(image)
    array = to_numpy(image, func, "image")
    if array.ndim == 4:
        array = array[check_index(batch_index, array.shape[0], func, "batch_index")]
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3:
        # Tensors follow torch's (C, H, W); arrays follow (H, W, C) unless only
        # the first axis looks like channels.
        if array.shape[0] in (1, 3) and (
            is_torch_tensor(image) or array.shape[-1] not in (1, 3, 4)
        ):
            array = np.moveaxis(array, 0, -1)
    else:
        raise VisualizerError(
            f"{func}: image must have shape (H, W, 3), (3, H, W), (B, 3, H, W) or (H, W); got "
            f"shape {array.shape}"
        )
    if array.shape[-1] not in (1, 3, 4):
        raise VisualizerError(
            f"{func}: image must have 1, 3 or 4 channels; got shape {array.shape}"
        )
    array = array[..., :3].astype(np.float64)
    if integer:
        array = array / 255.0
    if mean is not None or std is not None:
        array = array * np.asarray(1.0 if std is None else std) + np.asarray(
            0.0 if mean is None else mean
        )
    low, high = array.min(), array.max()
    if low < 0 or high > 1:
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _warn_if_unregistered(image, grid, func):
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


def _overlay(ax, image, heat, mode, alpha, cmap, vmin=None, vmax=None):
    """Draw ``image`` (if any) and ``heat`` ``(h, w)`` resized over it; return the heat image."""
    size = image.shape[:2] if image is not None else heat.shape
    extent = (0, size[1], size[0], 0)
    if image is not None:
        ax.imshow(image, extent=extent)
    shown = ax.imshow(
        upsample_to_image(heat, size, mode),
        extent=extent,
        cmap=cmap,
        alpha=alpha if image is not None else None,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )
    ax.set_axis_off()
    return shown


def _outline_patch(ax, row, col, grid, size, color="red"):
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


def _map_item(attn, batch_index, func, square=True):
    """One batch item of a map, ``(H, Q, N)``, with the batch size."""
    array, _ = attention_array(attn, func, square=square)
    return array[check_index(batch_index, array.shape[0], func, "batch_index")], array.shape[0]


def plot_head(attn, head=0, *, batch_index=0, layer=None, ax=None, cmap="viridis"):
    """One head's full map (query rows, key columns) as a heatmap with a colorbar.

    Args:
        attn: attention map ``(B, H, N, N)`` or ``(H, N, N)``.
        head: head index.
        batch_index: batch item to draw.
        layer: layer number for the title (display only).
        ax: axes to draw in; None makes a new figure.
        cmap: matplotlib colormap.

    Returns:
        the Figure.

    Example:
        >>> import numpy as np
        >>> fig = plot_head(np.full((2, 5, 5), 0.2), head=1, layer=3)
        >>> fig.axes[0].get_title()
        'layer 3, head 1'
    """
    func = "plot_head"
    item, batch_size = _map_item(attn, batch_index, func, square=False)
    head = check_index(head, item.shape[0], func, "head")
    fig, ax = _single_axes(ax, (5.5, 4.5))
    shown = ax.imshow(item[head], cmap=cmap, interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    layer_part, item_part = _context(layer, batch_index, batch_size)
    ax.set_title(_label(layer_part, f"head {head}", item_part))
    return fig


def plot_heads(attn, *, batch_index=0, layer=None, ncols=4, fig=None, cmap="viridis"):
    """Every head of one layer in a grid, followed by the average over heads.

    Args:
        attn: attention map ``(B, H, N, N)`` or ``(H, N, N)``.
        batch_index: batch item to draw.
        layer: layer number for the title (display only).
        ncols: panels per row.
        fig: figure (or subfigure) to draw in; None makes a new one.
        cmap: matplotlib colormap.

    Returns:
        the Figure, with ``H + 1`` axes: heads in order, then the mean.

    Example:
        >>> import numpy as np
        >>> len(plot_heads(np.full((3, 4, 4), 0.25)).axes)
        4
    """
    func = "plot_heads"
    item, batch_size = _map_item(attn, batch_index, func, square=False)
    heads = item.shape[0]
    fig, axes = _panel_grid(fig, heads + 1, ncols)
    for index, (ax, values) in enumerate(zip(axes, [*item, item.mean(axis=0)])):
        ax.imshow(values, cmap=cmap, interpolation="nearest")
        ax.set_title(f"head {index}" if index < heads else "mean of heads")
        ax.set_axis_off()
    fig.suptitle(_label(*_context(layer, batch_index, batch_size)) or "attention heads")
    return fig


def _query_cell(query, grid, func):
    """``(row, col)`` of a query given as ``(row, col)`` or a flat patch index."""
    if isinstance(query, (int, np.integer)):
        return divmod(check_index(query, grid[0] * grid[1], func, "query"), grid[1])
    try:
        row, col = query
    except (TypeError, ValueError):
        raise VisualizerError(
            f"{func}: query must be a patch index or (row, col); got {query!r}"
        ) from None
    return check_index(row, grid[0], func, "query row"), check_index(
        col, grid[1], func, "query col"
    )


def plot_query_attention(
    attn,
    query,
    image=None,
    *,
    grid_size=None,
    num_prefix_tokens=1,
    head=None,
    batch_index=0,
    show_cls=False,
    layer=None,
    mode="bilinear",
    alpha=0.6,
    cmap="jet",
    mean=None,
    std=None,
    fig=None,
):
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
        num_prefix_tokens: CLS plus register tokens before the patches.
        head: head index, or None for the mean over heads.
        batch_index: batch item to draw (of the map and of a batched image).
        show_cls: add the panel with the prefix tokens' weights.
        layer: layer number for the title (display only).
        mode: ``"bilinear"`` or ``"nearest"`` upsampling to the image.
        alpha: opacity of the attention over the image.
        cmap: matplotlib colormap.
        mean, std: per-channel normalization to undo on the image.
        fig: figure (or subfigure) to draw in; None makes a new one.

    Returns:
        the Figure: axes ``[image, overlay]`` plus ``[prefix weights]`` with
        ``show_cls``.

    Example:
        >>> import numpy as np
        >>> fig = plot_query_attention(np.full((2, 5, 5), 0.2), (1, 0), grid_size=(2, 2))
        >>> fig.axes[0].patches[0].get_xy()
        (0.0, 1.0)
    """
    func = "plot_query_attention"
    item, batch_size = _map_item(attn, batch_index, func)
    grid = grid_shape(item.shape[-1], num_prefix_tokens, grid_size, func)
    if show_cls and num_prefix_tokens < 1:
        raise VisualizerError(
            f"{func}: show_cls needs a CLS token (num_prefix_tokens >= 1); got "
            f"{num_prefix_tokens!r}"
        )
    row, col = _query_cell(query, grid, func)
    # Patch tokens follow the prefix tokens in row-major order.
    token = num_prefix_tokens + row * grid[1] + col
    if head is None:
        weights, head_part = item[:, token].mean(axis=0), "mean of heads"
    else:
        head = check_index(head, item.shape[0], func, "head")
        weights, head_part = item[head, token], f"head {head}"
    heat = weights[num_prefix_tokens:].reshape(grid)
    prefix = weights[:num_prefix_tokens]
    picture = _display_image(image, batch_index, mean, std, func)
    _warn_if_unregistered(picture, grid, func)
    size = picture.shape[:2] if picture is not None else grid

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
        axes[2].imshow(prefix[:, None], cmap=cmap, vmin=vmin, vmax=vmax)
        axes[2].set_xticks([])
        axes[2].set_yticks(
            range(num_prefix_tokens),
            ["CLS"] + [f"reg {index}" for index in range(1, num_prefix_tokens)],
        )
        axes[2].set_title(f"CLS {prefix[0]:.3f}")
    fig.suptitle(_label(f"attention of token {token}", *_context(layer, batch_index, batch_size)))
    return fig


def _artifact_list(mask_artifacts, item, num_prefix_tokens, func):
    """Token indices to zero: detected (True), given (a sequence) or none (False/None)."""
    if mask_artifacts is True:
        return [int(token) for token in find_artifact_tokens(item, num_prefix_tokens)]
    if mask_artifacts is False or mask_artifacts is None:
        return []
    tokens = item.shape[-1]
    try:
        given = [int(token) for token in mask_artifacts]
    except (TypeError, ValueError):
        raise VisualizerError(
            f"{func}: mask_artifacts must be a bool or a sequence of token indices; got "
            f"{mask_artifacts!r}"
        ) from None
    for token in given:
        if not num_prefix_tokens <= token < tokens:
            raise VisualizerError(
                f"{func}: mask_artifacts must hold patch token indices in [{num_prefix_tokens}, "
                f"{tokens}); got {token}"
            )
    return given


def plot_cls_attention(
    attn,
    image=None,
    *,
    grid_size=None,
    num_prefix_tokens=1,
    batch_index=0,
    heads=None,
    mode="nearest",
    threshold=None,
    mask_artifacts=False,
    layer=None,
    alpha=0.6,
    cmap="inferno",
    ncols=4,
    mean=None,
    std=None,
    fig=None,
):
    """CLS attention per head over the image, plus the head mean (DINO's ``visualize_attention``).

    Args:
        attn: attention map ``(B, H, N, N)`` or ``(H, N, N)`` (usually the last
            layer), or its CLS row ``(B, H, 1, N)``.
        image: the image the model saw (see module docstring), or None to draw
            on the patch grid.
        grid_size: patch grid ``(h, w)``; None infers a square grid.
        num_prefix_tokens: CLS plus register tokens before the patches.
        batch_index: batch item to draw (of the map and of a batched image).
        heads: head indices to draw; None draws all.
        mode: ``"nearest"`` (DINO's) or ``"bilinear"`` upsampling to the image.
        threshold: if set, a fraction in ``(0, 1]``: shade DINO's mask, the
            fewest patches holding that share of each panel's attention.
        mask_artifacts: True zeros the tokens :func:`find_artifact_tokens`
            reports for this item; a sequence zeros those token indices
            (full-token indexing, as in ``attentions[:, 283] = 0`` scripts).
            The title says which tokens were zeroed.
        layer: layer number for the title (display only).
        alpha: opacity of the attention over the image.
        cmap: matplotlib colormap.
        ncols: panels per row.
        mean, std: per-channel normalization to undo on the image.
        fig: figure (or subfigure) to draw in; None makes a new one.

    Returns:
        the Figure: one axes per drawn head, then one for the mean over them.
        Each axes holds the image (if given), the attention, and the mask layer
        (if ``threshold``), in that order.

    Example:
        >>> import numpy as np
        >>> fig = plot_cls_attention(np.full((2, 5, 5), 0.2), threshold=0.6)
        >>> [ax.get_title() for ax in fig.axes]
        ['head 0, 60% mass', 'head 1, 60% mass', 'mean of heads, 60% mass']
    """
    func = "plot_cls_attention"
    item, batch_size = _map_item(attn, batch_index, func, square=False)
    per_head = cls_attention(item, grid_size, num_prefix_tokens)  # (H, h, w)
    artifacts = _artifact_list(mask_artifacts, item, num_prefix_tokens, func)
    if artifacts:
        per_head = per_head.copy()
        rows, cols = np.divmod(np.asarray(artifacts) - num_prefix_tokens, per_head.shape[-1])
        per_head[:, rows, cols] = 0.0
    selected = (
        range(per_head.shape[0])
        if heads is None
        else [check_index(h, per_head.shape[0], func, "heads") for h in heads]
    )
    panels = [per_head[index] for index in selected] + [per_head[list(selected)].mean(axis=0)]
    titles = [f"head {index}" for index in selected] + ["mean of heads"]
    picture = _display_image(image, batch_index, mean, std, func)
    grid = per_head.shape[-2:]
    _warn_if_unregistered(picture, grid, func)
    size = picture.shape[:2] if picture is not None else grid
    masks = (
        threshold_mask(np.stack(panels), threshold)
        if threshold is not None
        else [None] * len(panels)
    )

    fig, axes = _panel_grid(fig, len(panels), ncols)
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
    return fig


def plot_mean_attention_distance(distances, *, ax=None, title="Mean attention distance"):
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
        >>> fig = plot_mean_attention_distance(np.array([[10.0, 50.0], [80.0, 90.0]]))
        >>> len(fig.axes[0].collections)
        2
    """
    func = "plot_mean_attention_distance"
    array = to_numpy(distances, func, "distances")
    if array.ndim != 2:
        raise VisualizerError(
            f"{func}: distances must have shape (L, H) (mean_attention_distance of a layer stack); "
            f"got shape {array.shape}"
        )
    fig, ax = _single_axes(ax, (6, 4.5))
    layers = np.arange(array.shape[0])
    for head in range(array.shape[1]):
        ax.scatter(layers, array[:, head], s=14, label=f"head {head}")
    ax.set_xticks(layers)  # whole layers, never fractional ticks
    # From zero, so differences are drawn to scale: an axis zoomed to the
    # data would make a 1 px spread look like a change of kind.
    ax.set_ylim(bottom=0)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title(title)
    if array.shape[1] <= 16:
        ax.legend(fontsize="x-small", ncols=2)
    return fig


def plot_cross_attention(
    cross_attn,
    queries,
    image,
    *,
    grid_size=None,
    boxes=None,
    batch_index=0,
    per_head=True,
    cmap="viridis",
    mean=None,
    std=None,
    fig=None,
):
    """DETR-style cross-attention: each object query's attention over the encoder feature map.

    One row per query: the image with the query's box, the attention averaged
    over heads, then each head's attention (if the map has heads and
    ``per_head``), each on the ``(h, w)`` feature grid.

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
        fig: figure (or subfigure) to draw in; None makes a new one.

    Returns:
        the Figure: for each query, axes ``[image, mean of heads, head 0, ...]``.

    Example:
        >>> import numpy as np
        >>> cross = np.full((1, 8, 6), 1 / 6)  # (B, Q, h*w), head-averaged
        >>> fig = plot_cross_attention(cross, [2, 5], np.zeros((20, 30, 3)), grid_size=(2, 3))
        >>> [ax.get_title() for ax in fig.axes]
        ['query 2', 'attention', 'query 5', 'attention']
    """
    func = "plot_cross_attention"
    array = cross_attention_array(cross_attn, func)
    batch_size, heads, num_queries, cells = array.shape
    item = array[check_index(batch_index, batch_size, func, "batch_index")]
    grid = grid_shape(cells, 0, grid_size, func)
    selected = [queries] if isinstance(queries, (int, np.integer)) else list(queries)
    selected = [check_index(query, num_queries, func, "queries") for query in selected]
    if not selected:
        raise VisualizerError(
            f"{func}: queries must name at least one object query; got {queries!r}"
        )
    box_array = None if boxes is None else to_numpy(boxes, func, "boxes")
    if box_array is not None:
        if box_array.shape[-1:] != (4,) or box_array.size != 4 * len(selected):
            raise VisualizerError(
                f"{func}: boxes must have shape ({len(selected)}, 4), one box per selected query; "
                f"got shape {box_array.shape}"
            )
        box_array = box_array.reshape(len(selected), 4)
    picture = _display_image(image, batch_index, mean, std, func)
    if picture is None:
        raise VisualizerError(
            f"{func}: image is required (the panel beside the attention); got None"
        )
    _warn_if_unregistered(picture, grid, func)
    extra_heads = heads if per_head and heads > 1 else 0
    ncols = 2 + extra_heads

    if fig is None:
        fig = Figure(figsize=(2.6 * ncols, 2.6 * len(selected) + 0.4), layout="constrained")
    axes = fig.subplots(len(selected), ncols, squeeze=False)
    size = picture.shape[:2]
    for row, query in enumerate(selected):
        image_ax = axes[row, 0]
        image_ax.imshow(picture, extent=(0, size[1], size[0], 0))
        image_ax.set_title(f"query {query}")
        image_ax.set_axis_off()
        if box_array is not None:
            x0, y0, x1, y1 = box_array[row]
            image_ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=2)
            )
        maps = [item[:, query].mean(axis=0)] + [item[head, query] for head in range(extra_heads)]
        titles = ["mean of heads" if heads > 1 else "attention"] + [
            f"head {head}" for head in range(extra_heads)
        ]
        for ax, values, title in zip(axes[row, 1:], maps, titles):
            ax.imshow(values.reshape(grid), cmap=cmap, interpolation="nearest")
            ax.set_title(title)
            ax.set_axis_off()
    return fig


def plot_rollout(
    rollout,
    image=None,
    *,
    grid_size=None,
    num_prefix_tokens=1,
    batch_index=0,
    mode="bilinear",
    alpha=0.6,
    cmap="jet",
    mean=None,
    std=None,
    title="attention rollout (CLS)",
    ax=None,
):
    """Attention rollout's CLS row overlaid on the image.

    Args:
        rollout: ``(B, N, N)`` or ``(N, N)`` from
            :func:`visualizer.analysis.attention_rollout` or
            :func:`visualizer.analysis.gradient_rollout`.
        image: the image the model saw (see module docstring), or None to draw
            on the patch grid.
        grid_size: patch grid ``(h, w)``; None infers a square grid.
        num_prefix_tokens: CLS plus register tokens before the patches.
        batch_index: batch item to draw (of the rollout and of a batched image).
        mode: ``"bilinear"`` or ``"nearest"`` upsampling to the image.
        alpha: opacity of the rollout over the image.
        cmap: matplotlib colormap.
        mean, std: per-channel normalization to undo on the image.
        title: axes title.
        ax: axes to draw in; None makes a new figure.

    Returns:
        the Figure.

    Example:
        >>> import numpy as np
        >>> fig = plot_rollout(np.eye(5), grid_size=(2, 2))
        >>> fig.axes[0].images[0].get_array().shape
        (2, 2)
    """
    func = "plot_rollout"
    heat = rollout_cls_attention(rollout, grid_size, num_prefix_tokens)
    if heat.ndim == 3:
        heat = heat[check_index(batch_index, heat.shape[0], func, "batch_index")]
    picture = _display_image(image, batch_index, mean, std, func)
    _warn_if_unregistered(picture, heat.shape, func)
    fig, ax = _single_axes(ax, (5, 5))
    _overlay(ax, picture, heat, mode, alpha, cmap)
    ax.set_title(title)
    return fig

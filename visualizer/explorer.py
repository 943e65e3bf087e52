"""The interactive attention explorer, one self-contained HTML page: `explore`.

The module is `explorer` (the page and its assets), the function `explore`:
`visualizer.explore` stays the function once this module is imported.

    with capture_attention(model) as maps:
        model(img)
    explore(maps, image=img, geometry=ImageGeometry.from_model(model))  # last line of a cell
    explore(maps, tokens=tokens).save("attention.html")                 # one file, offline

The page holds its JavaScript (``explorer.js``), its CSS (``explorer.css``) and
the maps inline: it makes no network request, needs no kernel and no notebook
extension, and draws on ``<canvas>``. Three views, chosen per layer from the
inputs and switchable with the matrix view:

- image: a ViT's self-attention over the image it saw (``image=`` with
  ``geometry=``); hovering a patch draws its attention row over the image,
  with every head of the layer as thumbnails, the prefix tokens (CLS,
  registers) as their own cells and attention rollout as a layer option;
- tokens: a head view (BertViz's lines) for text or any model given
  ``tokens=``; encoder-decoder cross-attention takes ``query_tokens=``;
- cross: object queries (DETR) or text over an image's feature grid, each
  query's map over the image, optionally with its box.

Maps are embedded as 8 bits per value, scaled per query row: a value ``v`` of
a row whose largest value is ``m`` is shown as ``v'`` with
``|v' - v| <= m / 508`` (:data:`ERROR_BOUND_PER_ROW_MAX`); exact zeros (masked,
causal or padded positions) stay exactly zero and are drawn as masked.
"""

import base64
import collections
import fnmatch
import html
import itertools
import json
import math
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._arrays import (
    ArrayOrTensor,
    check_bool,
    check_index,
    check_path,
    check_probabilities,
    image_pixels,
    index_list,
    is_torch_tensor,
    positive_int,
    sequence_of,
    to_numpy,
)
from ._errors import VisualizerError
from ._warnings import warn_user
from .analysis import ImageGeometry, attention_rollout

_WHO = "explore"

# Codes 1..255 stand for 0..row max in 254 steps; code 0 is an exact zero.
_STEPS = 254
# The largest error of a shown value, as a share of its row's largest value:
# rounding to the nearest of 254 steps is off by at most half a step.
ERROR_BOUND_PER_ROW_MAX = 1 / (2 * _STEPS)

# Default page budget: the 10 MB for a ViT-B/16 at 224 px, all maps.
DEFAULT_MAX_BYTES = 10_000_000

_ASSETS = Path(__file__).with_name("explorer.js"), Path(__file__).with_name("explorer.css")

# What `layers=` accepts: a glob over layer names, an index, or a list of them.
LayerChoice = Union[str, int, Sequence[Union[str, int]]]
IndexChoice = Union[int, Sequence[int]]


class _Layer:
    """One layer's map of the chosen batch item, ``(H, Q, K)``, and how it is shown."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name = name
        self.array = array
        self.kind = "tokens"
        self.heads: List[int] = list(range(array.shape[0]))
        # Which query of the model each row of `array` is (a rows= capture
        # keeps the first rows: CLS is row 0).
        self.rows: List[int] = list(range(array.shape[1]))
        self.query_labels: Optional[str] = None  # "tokens", "query_tokens" or None
        self.key_labels: Optional[str] = None

    def first(self, heads: int, rows: int) -> "_Layer":
        """The same layer cut to its first ``heads`` heads and first ``rows`` query rows."""
        part = _Layer(self.name, self.array[:heads, :rows])
        part.kind, part.heads, part.rows = self.kind, self.heads[:heads], self.rows[:rows]
        part.query_labels, part.key_labels = self.query_labels, self.key_labels
        return part


def explore(
    maps: Any,
    *,
    image: Optional[ArrayOrTensor] = None,
    geometry: Optional[ImageGeometry] = None,
    tokens: Optional[Sequence[Any]] = None,
    query_tokens: Optional[Sequence[Any]] = None,
    boxes: Optional[ArrayOrTensor] = None,
    batch: int = 0,
    layers: Optional[LayerChoice] = None,
    heads: Optional[IndexChoice] = None,
    rows: Optional[IndexChoice] = None,
    rollout: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> "Explorer":
    """Build the interactive explorer of attention maps: one self-contained HTML page.

    Args:
        maps: what the library captures: ``AttentionMaps`` (module path ->
            list of ``(B, H, Q, K)`` maps; a module called several times gives
            one layer per call), a ``get_local.cache`` dict, one cache entry
            (a list of per-call maps), or a stacked array ``(L, B, H, Q, K)``,
            ``(L, H, Q, K)`` or ``(H, Q, K)``; numpy or torch, any float dtype.
            Maps captured for the first rows only (``rows=0``: Q = 1) are shown
            for the rows they have.
        image: the image the model saw (``(3, H, W)``, ``(H, W, 3)``, a batch of
            them, uint8 or float; ``geometry.mean``/``std`` undo a normalization).
        geometry: the patch grid and prefix tokens (``ImageGeometry.from_model``);
            cross-attention over a feature map takes ``num_prefix_tokens=0``.
            None with an image: one CLS token and a square grid.
        tokens: one label per key of token maps (text, or any model's tokens).
        query_tokens: labels of the queries of cross-attention (decoder tokens,
            object queries) when they differ from ``tokens``.
        boxes: pixel ``(x0, y0, x1, y1)`` per object query, ``(Q, 4)`` or
            ``(B, Q, 4)``, drawn in the cross-attention view.
        batch: which batch item to show.
        layers: globs over layer names (``"encoder.*"``) or layer indices.
        heads: head indices to embed (all by default).
        rows: query rows to embed (all by default; ``0`` keeps the CLS row).
        rollout: add attention rollout (mean of heads) as a layer option of
            the image view.
        max_bytes: page size budget. What does not fit is left out from the
            end: the layers are kept in order (rollout last), head by head, and
            when not one head fits, the first query rows of the first; the page
            and a warning say what was left out and how to choose.

    Returns:
        an :class:`Explorer`: it displays itself in a notebook and has ``.save(path)``.

    Example:
        >>> import numpy as np
        >>> page = explore(np.full((2, 3, 3), 1 / 3), tokens=["a", "<b>", "c"])
        >>> page.layer_names, page.views
        (['layer 0'], ['tokens'])
    """
    func = _WHO
    positive_int(max_bytes, func, "max_bytes")
    check_bool(rollout, func, "rollout")
    named = _choose_layers(_named_layers(maps, batch, func), layers, func)
    token_labels = _labels(tokens, func, "tokens")
    query_labels = _labels(query_tokens, func, "query_tokens")
    if geometry is not None and not isinstance(geometry, ImageGeometry):
        raise VisualizerError(
            f"{func}: geometry must be an ImageGeometry or None; got {type(geometry).__name__}"
        )
    layout = geometry if geometry is not None else (ImageGeometry() if image is not None else None)
    grids: Dict[str, Tuple[int, int]] = {}
    for layer in named:
        _classify(layer, layout, token_labels, query_labels, boxes is not None, grids, func)
    for layer in named:
        _select(layer, heads, rows, func)
    picture = None
    if image is not None:
        assert layout is not None  # an image always has a layout (see above)
        if not grids:
            keys = sorted({layer.array.shape[-1] for layer in named})
            raise VisualizerError(
                f"{func}: image is given but no map has the geometry's tokens as keys: expected "
                f"{layout.num_tokens or 'a square grid plus'} {layout.num_prefix_tokens} prefix "
                f"tokens and grid {layout.grid_size}; got maps with {keys} keys"
            )
        picture = _image_pixels(image, batch, layout, grids, func)
    elif any(layer.kind != "tokens" for layer in named):
        raise VisualizerError(f"{func}: image is required with geometry=; got image=None")
    box_list = _boxes(boxes, batch, named, func)
    if rollout:
        named = named + _with_rollout(named, grids)
    return Explorer(named, layout, grids, picture, token_labels, query_labels, box_list, max_bytes)


class Explorer:
    """The explorer page: displays itself in a notebook; ``.save(path)`` writes it as a file.

    Attributes:
        html: the standalone page (``<!DOCTYPE html>`` ..., JS, CSS and data inline).
        layer_names: the layers embedded, in the order of the page's layer menu.
        views: the view of each embedded layer: ``"image"``, ``"tokens"`` or ``"cross"``.
        left_out: what the size budget left out and how to choose, or None.
        error_bound: the largest difference between a value shown and the map's.
        nbytes: the size of :attr:`html` in bytes.
    """

    def __init__(
        self,
        layers: List[_Layer],
        layout: Optional[ImageGeometry],
        grids: Dict[str, Tuple[int, int]],
        picture: Optional[np.ndarray],
        tokens: Optional[List[str]],
        query_tokens: Optional[List[str]],
        boxes: Optional[List[List[float]]],
        max_bytes: int,
    ) -> None:
        self.id = "visualizer-explorer-" + uuid.uuid4().hex[:12]
        script, style = (path.read_text(encoding="utf-8") for path in _ASSETS)
        image_entry = None
        if picture is not None:
            image_entry = {
                "height": int(picture.shape[0]),
                "width": int(picture.shape[1]),
                "rgb": base64.b64encode(picture.tobytes()).decode("ascii"),
            }
        header = {
            "id": self.id,
            "image": image_entry,
            "prefix": 0 if layout is None else layout.num_prefix_tokens,
            "tokens": tokens,
            "queryTokens": query_tokens,
            "boxes": boxes,
            "errorBound": _ERROR_TEXT,
        }
        # Everything but the maps, with room for the layer table, counts
        # against the budget first.
        fixed = len(script) + len(style) + len(json.dumps(header)) + 2000 + 300 * len(layers)
        kept, self.left_out = _fit(layers, (max_bytes - fixed) * 3 // 4, max_bytes)
        blob, scales, table = _encode(kept, grids)
        payload = {
            **header,
            "layers": table,
            "codes": base64.b64encode(blob).decode("ascii"),
            "scales": base64.b64encode(scales).decode("ascii"),
            "leftOut": self.left_out,
        }
        self.layer_names = [layer.name for layer in kept]
        self.views = [layer.kind for layer in kept]
        self.error_bound = float(
            max((layer.array.max() for layer in kept), default=0.0) * ERROR_BOUND_PER_ROW_MAX
        )
        # Inside a <script> element "</script>" ends it and "<!--" changes how
        # the rest is parsed: no "<" at all reaches the page as such (JSON
        # reads "\u003c" as "<"), so a token is always data.
        data = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")
        self._fragment = (
            f'<div class="visualizer-explorer" id="{self.id}">'
            f"<style>{style}</style>"
            # Shown until the script replaces it: an untrusted notebook does
            # not run its outputs' scripts.
            '<div class="vx-fallback">Attention explorer: this needs the output\'s script to '
            "run. If you see this text, trust the notebook (or open the saved .html file).</div>"
            f'<script type="application/json" class="visualizer-explorer-data">{data}</script>'
            # Its own parent, found from the running script: JupyterLab runs an
            # output's scripts before the output is in the document, where
            # getElementById would find nothing.
            f"<script>{script}\nwindow.visualizerExplorer(document.currentScript.parentNode);"
            "</script></div>"
        )
        self.html = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>attention explorer: {html.escape(', '.join(self.layer_names[:3]))}</title>"
            f"</head><body>{self._fragment}</body></html>\n"
        )
        self.nbytes = len(self.html.encode("utf-8"))
        if self.left_out is not None:
            warn_user(f"{_WHO}: {self.left_out}")

    def _repr_html_(self) -> str:
        return self._fragment

    def save(self, path: Union[str, Path]) -> Path:
        """Write the page to ``path`` (one file that opens offline anywhere); return the path."""
        check_path(path, "Explorer.save")
        target = Path(path)
        target.write_text(self.html, encoding="utf-8")
        return target

    def __repr__(self) -> str:
        views = ", ".join(sorted(set(self.views)))
        return (
            f"Explorer({len(self.layer_names)} layers, views: {views}, "
            f"{self.nbytes / 1e6:.1f} MB{', some maps left out' if self.left_out else ''})"
        )


_ERROR_TEXT = (
    "Values are stored in 8 bits per value, scaled per query row: a value shown differs from "
    "the captured one by at most 1/508 of its row's largest value; exact zeros (masked "
    "positions) are exact."
)


# ------------------------------------------------------------------ inputs


def _named_layers(maps: Any, batch: int, func: str) -> List[_Layer]:
    """One ``_Layer`` per captured map, batch item ``batch`` taken, named by its key."""
    named: List[Tuple[str, Any]] = []
    if isinstance(maps, Mapping):
        for key, calls in maps.items():
            calls = list(calls) if isinstance(calls, (list, tuple, collections.deque)) else [calls]
            for index, entry in enumerate(calls):
                # A module called several times (generate(), two forwards)
                # gives one layer per call.
                named.append((str(key) if len(calls) == 1 else f"{key} [call {index}]", entry))
        what = f"an empty {type(maps).__name__}"
    elif isinstance(maps, (list, tuple, collections.deque)):
        named = [(f"layer {index}", entry) for index, entry in enumerate(maps)]
        what = f"an empty {type(maps).__name__}"
    else:
        array = maps if is_torch_tensor(maps) or isinstance(maps, np.ndarray) else to_numpy(
            maps, func, "maps"
        )
        if array.ndim == 5:
            named = [(f"layer {index}", array[index]) for index in range(array.shape[0])]
        elif array.ndim == 4:  # (L, H, Q, K): a stack of one item's maps
            named = [(f"layer {index}", array[index][None]) for index in range(array.shape[0])]
        elif array.ndim == 3:
            named = [("layer 0", array[None])]
        else:
            raise VisualizerError(
                f"{func}: maps must be AttentionMaps, a list of (B, H, Q, K) maps, or an array "
                f"(L, B, H, Q, K), (L, H, Q, K) or (H, Q, K); got shape {tuple(array.shape)}"
            )
        what = f"an array of shape {tuple(array.shape)}"
    if not named:
        raise VisualizerError(
            f"{func}: maps holds no attention map; expected at least one (B, H, Q, K) map, got "
            f"{what} (nothing was captured: did the model run inside capture_attention?)"
        )
    return [_Layer(name, _item(entry, batch, func, name)) for name, entry in named]


def _item(entry: Any, batch: int, func: str, name: str) -> np.ndarray:
    """Item ``batch`` of one map ``(B, H, Q, K)`` (or ``(H, Q, K)``) as float ``(H, Q, K)``."""
    shape = tuple(entry.shape) if hasattr(entry, "shape") else np.shape(entry)
    if len(shape) == 4:
        where = f"batch (of the map {name!r} of maps)"
        entry = entry[check_index(batch, shape[0], func, where)]
    elif len(shape) != 3:
        raise VisualizerError(
            f"{func}: the map {name!r} of maps must have shape (B, H, Q, K) or (H, Q, K); got "
            f"shape {shape}"
        )
    array = to_numpy(entry, func, f"the map {name!r} of maps")
    check_probabilities(array, func, f"the map {name!r} of maps")
    return array


def _choose_layers(named: List[_Layer], layers: Optional[LayerChoice], func: str) -> List[_Layer]:
    if layers is None:
        return named
    choices = sequence_of(
        layers, (str, int, np.integer), func, "layers", "globs over layer names or indices"
    )
    chosen: List[int] = []
    for choice in choices:
        if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
            matches = [check_index(choice, len(named), func, "layers")]
        elif isinstance(choice, str):
            matches = [
                index
                for index, layer in enumerate(named)
                if fnmatch.fnmatchcase(layer.name, choice)
            ]
        else:
            raise VisualizerError(
                f"{func}: layers must be globs over layer names or indices; got {choice!r}"
            )
        if not matches:
            raise VisualizerError(
                f"{func}: layers={choice!r} matches none of the layers "
                f"{[layer.name for layer in named][:8]}"
            )
        chosen += [index for index in matches if index not in chosen]
    if not chosen:
        raise VisualizerError(f"{func}: layers must choose at least one layer; got {layers!r}")
    return [named[index] for index in sorted(chosen)]


def _labels(values: Optional[Sequence[Any]], func: str, name: str) -> Optional[List[str]]:
    if values is None:
        return None
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise VisualizerError(
            f"{func}: {name} must be a list of strings, one per token; got {type(values).__name__}"
        )
    return [str(value) for value in values]


def _image_grid(layer: _Layer, layout: ImageGeometry) -> Optional[Tuple[int, int]]:
    """The patch grid of ``layer``'s keys under ``layout``, or None if they are not patches."""
    keys = layer.array.shape[-1]
    if layout.grid_size is not None:
        return layout.grid_size if keys == layout.num_tokens else None
    patches = keys - layout.num_prefix_tokens
    side = math.isqrt(max(patches, 0))
    return (side, side) if patches > 0 and side * side == patches else None


def _classify(
    layer: _Layer,
    layout: Optional[ImageGeometry],
    tokens: Optional[List[str]],
    query_tokens: Optional[List[str]],
    has_boxes: bool,
    grids: Dict[str, Tuple[int, int]],
    func: str,
) -> None:
    """Set ``layer.kind`` (and its labels) from its shape and what labels the user gave."""
    _, queries, keys = layer.array.shape
    grid = None if layout is None else _image_grid(layer, layout)
    if grid is not None and not (tokens is not None and len(tokens) == keys):
        grids[layer.name] = grid
        prefix = layout.num_prefix_tokens if layout is not None else 0
        if queries == keys:
            layer.kind = "image"
        elif prefix == 0 or query_tokens is not None or has_boxes:
            layer.kind = "cross"  # object queries or text over the image's cells
            if query_tokens is not None:
                if len(query_tokens) != queries:
                    raise VisualizerError(
                        f"{func}: query_tokens has {len(query_tokens)} labels but the map "
                        f"{layer.name!r} has {queries} queries (shape {layer.array.shape})"
                    )
                layer.query_labels = "query_tokens"
        elif queries < keys:
            layer.kind = "image"  # a rows= capture: the first rows, CLS first
        else:
            raise VisualizerError(
                f"{func}: the map {layer.name!r} of maps has more query rows than keys: shape "
                f"{layer.array.shape}; expected (H, Q, {keys}) with Q <= {keys}"
            )
        return
    layer.kind = "tokens"
    lists = [("tokens", tokens), ("query_tokens", query_tokens)]
    given = [(name, values) for name, values in lists if values is not None]
    if not given:
        return  # positions are the labels
    key_names = [name for name, values in given if len(values) == keys]
    if not key_names:
        lengths = ", ".join(f"{name} has {len(values)}" for name, values in given)
        raise VisualizerError(
            f"{func}: the labels must have one entry per key: the map {layer.name!r} of maps has "
            f"{keys} keys (shape {layer.array.shape}) but {lengths}"
        )
    layer.key_labels = key_names[0]
    query_names = [name for name, values in given if len(values) == queries]
    if layer.key_labels in query_names:
        layer.query_labels = layer.key_labels  # self-attention: the same tokens on both sides
    elif query_names:
        layer.query_labels = query_names[0]
    elif queries < keys:
        layer.query_labels = layer.key_labels  # the first rows of a rows= capture
    else:
        raise VisualizerError(
            f"{func}: the map {layer.name!r} of maps has {queries} queries (shape "
            f"{layer.array.shape}) but no label list has {queries} entries; pass query_tokens= "
            "with one per query"
        )


def _indices(choice: Optional[IndexChoice], size: int, func: str, name: str) -> Optional[List[int]]:
    if choice is None:
        return None
    return sorted(set(index_list(choice, size, func, name)))


def _select(
    layer: _Layer, heads: Optional[IndexChoice], rows: Optional[IndexChoice], func: str
) -> None:
    count, queries, _ = layer.array.shape
    head_list = _indices(heads, count, func, "heads")
    row_list = _indices(rows, queries, func, "rows")
    if head_list is not None:
        layer.heads = head_list
        layer.array = layer.array[head_list]
    if row_list is not None:
        layer.rows = row_list
        layer.array = layer.array[:, row_list]


def _image_pixels(
    image: ArrayOrTensor,
    batch: int,
    layout: ImageGeometry,
    grids: Dict[str, Tuple[int, int]],
    func: str,
) -> np.ndarray:
    """The image the model saw as uint8 ``(height, width, 3)``, checked against the geometry.

    The conventions of ``plot``: ``(C, H, W)`` tensors, ``(H, W, C)`` arrays,
    integer images as 0-255, ``layout.mean``/``std`` undone, float values
    outside ``[0, 1]`` stretched to it.
    """
    array = image_pixels(image, batch, layout.mean, layout.std, func, "batch")
    height, width = array.shape[:2]
    expected = layout.image_size
    if expected is not None and (height, width) != tuple(int(side) for side in expected):
        raise VisualizerError(
            f"{func}: image must be the {int(expected[0])}x{int(expected[1])} pixels the "
            f"geometry describes (grid {layout.grid_size} of {layout.patch_size} px patches); "
            f"got {height}x{width}: pass the image the model saw, after resize and crop"
        )
    for grid in set(grids.values()):
        aspect = (height / grid[0]) / (width / grid[1])
        if not 0.9 <= aspect <= 1.1:
            raise VisualizerError(
                f"{func}: image must have the aspect of the patch grid {grid}; got {height}x"
                f"{width} pixels, patches of {height / grid[0]:.1f}x{width / grid[1]:.1f}: pass "
                "the image the model saw, after resize and crop"
            )
    return np.ascontiguousarray(np.rint(array * 255).astype(np.uint8))


def _boxes(
    boxes: Optional[ArrayOrTensor], batch: int, layers: List[_Layer], func: str
) -> Optional[List[List[float]]]:
    if boxes is None:
        return None
    array = to_numpy(boxes, func, "boxes").astype(np.float64)
    if array.ndim == 3:
        array = array[check_index(batch, array.shape[0], func, f"batch (of boxes {array.shape})")]
    queries = {layer.array.shape[1] for layer in layers if layer.kind == "cross"}
    if array.ndim != 2 or array.shape[1] != 4 or (queries and array.shape[0] not in queries):
        raise VisualizerError(
            f"{func}: boxes must have shape (Q, 4) or (B, Q, 4), pixel (x0, y0, x1, y1) per "
            f"object query (Q in {sorted(queries)}); got shape {tuple(np.shape(boxes))}"
        )
    return [[float(value) for value in box] for box in array]


def _with_rollout(layers: List[_Layer], grids: Dict[str, Tuple[int, int]]) -> List[_Layer]:
    """Attention rollout through the image layers with every row, as one extra layer."""
    full = [
        layer for layer in layers
        if layer.kind == "image" and layer.array.shape[1] == layer.array.shape[2]
        and len(layer.rows) == layer.array.shape[2]
    ]
    if not full or len({layer.array.shape for layer in full}) != 1:
        return []
    # Rollout fuses the heads embedded (mean), through the layers in forward order.
    result = attention_rollout([layer.array[None] for layer in full])[0]
    rolled = _Layer(f"rollout (mean of heads, {len(full)} layers)", result[None])
    rolled.kind = "image"
    rolled.heads = [-1]  # not a head of the model: the page names it "rollout"
    grids[rolled.name] = grids[full[0].name]
    return [rolled]


# ------------------------------------------------------------------ encoding


def _unit_bytes(layer: _Layer) -> int:
    """Bytes one head of ``layer`` takes: a code per value, a float32 scale per row."""
    return layer.array.shape[1] * (layer.array.shape[2] + 4)


def _fit(
    layers: List[_Layer], budget: int, max_bytes: int
) -> Tuple[List[_Layer], Optional[str]]:
    """The layers (heads, rows) that fit ``budget`` bytes, in order; and what was left out."""
    total = sum(_unit_bytes(layer) * layer.array.shape[0] for layer in layers)
    if total <= budget:
        return layers, None
    kept: List[_Layer] = []
    left: List[str] = []
    remaining = budget
    for position, layer in enumerate(layers):
        count = min(layer.array.shape[0], max(remaining, 0) // _unit_bytes(layer))
        if count == 0 and not kept:
            # Not one head fits: keep the first rows of the first head.
            row_count = max(remaining, 0) // (layer.array.shape[2] + 4)
            if row_count == 0:
                raise VisualizerError(
                    f"{_WHO}: max_bytes={max_bytes} leaves no room for one query row of "
                    f"{layer.name!r} ({layer.array.shape[2]} keys); raise max_bytes"
                )
            kept.append(layer.first(1, row_count))
            left.append(
                f"{layer.name!r}: heads {_spans(layer.heads[1:])} and query rows "
                f"{_spans(layer.rows[row_count:])} of head {layer.heads[0]}"
            )
            remaining = 0
            continue
        if count == 0:
            names = [item.name for item in layers[position:]]
            left.append(f"{len(names)} layers: {', '.join(repr(name) for name in names)}")
            break
        if count < layer.array.shape[0]:
            left.append(f"{layer.name!r}: heads {_spans(layer.heads[count:])}")
        kept.append(layer.first(count, len(layer.rows)))
        remaining -= count * _unit_bytes(layer)
    message = (
        f"the maps take {total * 4 / 3 / 1e6:.1f} MB and the page is limited to "
        f"max_bytes={max_bytes / 1e6:.1f} MB, so these were left out: {'; '.join(left)}. "
        "Choose what to embed with layers= (globs or indices), heads= and rows= (rows=0: the "
        "CLS row only), or raise max_bytes"
    )
    return kept, message


def _spans(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
    if not values:
        return "none"
    parts = []
    for _, run in itertools.groupby(enumerate(values), lambda pair: pair[1] - pair[0]):
        items = [value for _, value in run]
        parts.append(str(items[0]) if len(items) == 1 else f"{items[0]}-{items[-1]}")
    return ", ".join(parts)


def encode_rows(array: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Attention rows ``(..., K)`` as 8-bit codes ``(..., K)`` and float32 row maxima ``(...)``.

    Code 0 is an exact zero; code ``c >= 1`` stands for ``(c - 1) / 254 * m``,
    ``m`` the row's largest value, so a decoded value is within ``m / 508`` of
    the original (:data:`ERROR_BOUND_PER_ROW_MAX`). :func:`decode_rows` inverts it.

    Example:
        >>> codes, peaks = encode_rows(np.array([[0.0, 0.25, 0.75]]))
        >>> codes.tolist(), peaks.tolist()
        ([[0, 86, 255]], [0.75])
    """
    array = _rows(array, "encode_rows", "array")
    peaks = array.max(axis=-1).astype(np.float32)
    safe = np.where(peaks > 0, peaks, 1.0)[..., None]
    steps = np.rint(array / safe * _STEPS) + 1
    codes = np.where(array > 0, np.clip(steps, 1, _STEPS + 1), 0).astype(np.uint8)
    return codes, peaks


def decode_rows(codes: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """The values :func:`encode_rows` stands for, as the page decodes them (float64)."""
    func = "decode_rows"
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim < 1:
        raise VisualizerError(
            f"{func}: codes must be the uint8 array (..., K) of encode_rows; got "
            f"{_described(codes)}"
        )
    peaks = _rows(peaks, func, "peaks", keys=False)
    if peaks.shape != codes.shape[:-1]:
        raise VisualizerError(
            f"{func}: peaks must have the shape of codes without its last axis, "
            f"{codes.shape[:-1]}; got shape {peaks.shape}"
        )
    values = (codes.astype(np.float64) - 1) / _STEPS * peaks[..., None].astype(np.float64)
    return np.where(codes > 0, values, 0.0)


def _rows(value: Any, func: str, name: str, keys: bool = True) -> np.ndarray:
    """``value`` as a numpy array of finite numbers >= 0: rows ``(..., K)``, K >= 1, if ``keys``."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise VisualizerError(
            f"{func}: {name} must be a numpy array of real numbers; got {_described(value)}"
        )
    if keys and (value.ndim < 1 or value.shape[-1] == 0):
        raise VisualizerError(
            f"{func}: {name} must have shape (..., K) with K >= 1 keys; got shape {value.shape}"
        )
    if not np.isfinite(value).all() or (value < 0).any():
        raise VisualizerError(
            f"{func}: {name} must hold finite numbers >= 0; got NaN, infinite or negative values"
        )
    return value


def _described(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"{type(value).__name__} {value!r}"


def _encode(
    layers: List[_Layer], grids: Dict[str, Tuple[int, int]]
) -> Tuple[bytes, bytes, List[Dict[str, Any]]]:
    """All layers' codes as one byte string, their row maxima as float32, and the layer table."""
    code_parts: List[bytes] = []
    scale_parts: List[bytes] = []
    table: List[Dict[str, Any]] = []
    code_offset = scale_offset = 0
    for layer in layers:
        codes, peaks = encode_rows(layer.array)
        keys = layer.array.shape[2]
        table.append(
            {
                "name": layer.name,
                "kind": layer.kind,
                "heads": layer.heads,
                "rows": layer.rows,
                "keys": keys,
                "grid": list(grids[layer.name]) if layer.name in grids else None,
                "queryLabels": layer.query_labels,
                "keyLabels": layer.key_labels,
                "codeOffset": code_offset,
                "scaleOffset": scale_offset,
            }
        )
        code_parts.append(codes.tobytes())
        scale_parts.append(peaks.astype("<f4").tobytes())
        code_offset += codes.size
        scale_offset += peaks.size
    return b"".join(code_parts), b"".join(scale_parts), table

"""How a vision transformer's tokens lie on its image: `ImageGeometry`, read from models.

Tokens are `num_prefix_tokens` prefix tokens (CLS, then distillation or
register tokens) followed by the patch grid (h, w) in row-major order. The
geometry is read from a Hugging Face config or a timm-like model, or given
by hand, once, and every analysis and plot function takes it as `geometry=`.
torch is not imported here.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Dict, Optional, Union

import numpy as np

from ._arrays import ArrayOrTensor, grid_pair, pair, to_numpy
from ._errors import VisualizerError


def _grid_pair(value: Any, func: str) -> Optional[tuple[int, int]]:
    """``grid_size`` as ``(h, w)`` ints (an int means a square grid), or None."""
    return None if value is None else grid_pair(value, func)


def _prefix_count(value: Any, func: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise VisualizerError(f"{func}: num_prefix_tokens must be an int >= 0; got {value!r}")
    return int(value)


def _patch_pair(value: Any, func: str) -> Optional[tuple[float, float]]:
    """``patch_size`` as ``(height, width)`` in pixels, ints kept as ints, or None."""
    if value is None:
        return None
    height, width = pair(value, func, "patch_size")
    # Patches are whole pixels in practice: show (16, 16), not (16.0, 16.0).
    return (
        int(height) if height.is_integer() else height,
        int(width) if width.is_integer() else width,
    )


def _grid_of_image(size: Any, patch: tuple[float, float], func: str) -> tuple[int, int]:
    """The patch grid ``(h, w)`` of an image of ``size`` pixels: at least one patch each way."""
    height, width = pair(size, func, "image_size")
    if height < patch[0] or width < patch[1]:
        raise VisualizerError(
            f"{func}: image_size {size!r} is smaller than one patch of patch_size {patch}; "
            "expected the size the model is run at"
        )
    return int(height // patch[0]), int(width // patch[1])


def _channels(value: Any, func: str, name: str) -> Optional[tuple[float, ...]]:
    """A per-channel ``mean``/``std`` as a tuple of floats, or None."""
    if value is None:
        return None
    values = to_numpy(value, func, name).astype(np.float64).ravel()
    if (
        values.size == 0
        or not np.isfinite(values).all()
        or (name == "std" and not (values > 0).all())
    ):
        raise VisualizerError(
            f"{func}: {name} must hold one {'positive ' if name == 'std' else ''}number per "
            f"channel, all finite; got {value!r}"
        )
    return tuple(float(item) for item in values)


@dataclasses.dataclass(frozen=True, init=False)
class ImageGeometry:
    """How a vision transformer's tokens lie on the image it saw: give it once, use it everywhere.

    Every function here and in :mod:`visualizer.plot` that takes ``grid_size``,
    ``num_prefix_tokens``, ``patch_size``, ``mean`` or ``std`` takes
    ``geometry=`` instead. An explicit argument given beside a geometry must
    agree with it (or fill a field the geometry leaves None); a different value
    is an error, never silently preferred.

    Attributes:
        grid_size: patch grid ``(h, w)``; None infers a square grid from a
            map's token count.
        num_prefix_tokens: tokens before the patches: CLS, then distillation
            (DeiT) or register tokens (DINOv2 with registers: 1 + 4).
        patch_size: ``(height, width)`` of a patch in pixels, or None.
        mean, std: per-channel normalization of the model's input (undone to
            draw the input tensor), or None.

    Construct it directly (ints are accepted for square grids and patches) or
    with :meth:`from_model` / :meth:`from_config`.

    Example:
        >>> geometry = ImageGeometry(grid_size=(14, 14), num_prefix_tokens=5, patch_size=16)
        >>> geometry.grid_size, geometry.patch_size, geometry.image_size, geometry.num_tokens
        ((14, 14), (16, 16), (224, 224), 201)
    """

    grid_size: Optional[tuple[int, int]]
    num_prefix_tokens: int
    patch_size: Optional[tuple[float, float]]
    mean: Optional[tuple[float, ...]]
    std: Optional[tuple[float, ...]]

    def __init__(
        self,
        grid_size: Union[int, tuple[int, int], None] = None,
        num_prefix_tokens: int = 1,
        patch_size: Union[float, tuple[float, float], None] = None,
        mean: Optional[ArrayOrTensor] = None,
        std: Optional[ArrayOrTensor] = None,
    ) -> None:
        func = "ImageGeometry"
        # object.__setattr__: the dataclass is frozen, and this __init__ (not
        # the generated one) normalizes what it is given.
        object.__setattr__(self, "grid_size", _grid_pair(grid_size, func))
        object.__setattr__(self, "num_prefix_tokens", _prefix_count(num_prefix_tokens, func))
        object.__setattr__(self, "patch_size", _patch_pair(patch_size, func))
        object.__setattr__(self, "mean", _channels(mean, func, "mean"))
        object.__setattr__(self, "std", _channels(std, func, "std"))

    @property
    def num_patches(self) -> Optional[int]:
        """``h * w``, or None when the grid is inferred."""
        return None if self.grid_size is None else self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> Optional[int]:
        """Prefix tokens plus patches: the side ``N`` of the model's maps, or None."""
        patches = self.num_patches
        return None if patches is None else self.num_prefix_tokens + patches

    @property
    def image_size(self) -> Optional[tuple[float, float]]:
        """``(height, width)`` in pixels of the image the grid covers, or None."""
        if self.grid_size is None or self.patch_size is None:
            return None
        return (
            self.grid_size[0] * self.patch_size[0],
            self.grid_size[1] * self.patch_size[1],
        )

    @classmethod
    def resolve(
        cls,
        geometry: Optional[ImageGeometry],
        *,
        caller: str,
        grid_size: Union[int, tuple[int, int], None] = None,
        num_prefix_tokens: Optional[int] = None,
        patch_size: Union[float, tuple[float, float], None] = None,
        mean: Optional[ArrayOrTensor] = None,
        std: Optional[ArrayOrTensor] = None,
    ) -> ImageGeometry:
        """The geometry a function uses, from ``geometry=`` and its explicit arguments.

        Explicit arguments (None: not given) fill the fields ``geometry``
        leaves None and must equal the ones it sets; without a geometry they
        alone count, ``num_prefix_tokens`` defaulting to 1. ``caller`` names the
        function in error messages.

        Example:
            >>> ImageGeometry.resolve(ImageGeometry(4), caller="f", patch_size=8).image_size
            (32, 32)
            >>> ImageGeometry.resolve(None, caller="f", grid_size=(2, 8)).num_prefix_tokens
            1
        """
        if geometry is not None and not isinstance(geometry, ImageGeometry):
            raise VisualizerError(
                f"{caller}: geometry must be an ImageGeometry or None; got "
                f"{type(geometry).__name__}"
            )
        grid = _grid_pair(grid_size, caller)
        prefix = None if num_prefix_tokens is None else _prefix_count(num_prefix_tokens, caller)
        patch = _patch_pair(patch_size, caller)
        mean_values, std_values = _channels(mean, caller, "mean"), _channels(std, caller, "std")
        if geometry is None:
            return cls(grid, 1 if prefix is None else prefix, patch, mean_values, std_values)
        given = {
            "grid_size": grid,
            "num_prefix_tokens": prefix,
            "patch_size": patch,
            "mean": mean_values,
            "std": std_values,
        }
        merged: Dict[str, Any] = dataclasses.asdict(geometry)
        for name, value in given.items():
            if value is None:
                continue
            if merged[name] is not None and merged[name] != value:
                raise VisualizerError(
                    f"{caller}: {name}={value!r} conflicts with geometry.{name}="
                    f"{merged[name]!r}; pass one of them"
                )
            merged[name] = value
        return cls(**merged)

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        image_size: Union[int, tuple[int, int], None] = None,
        num_prefix_tokens: Optional[int] = None,
        mean: Optional[ArrayOrTensor] = None,
        std: Optional[ArrayOrTensor] = None,
    ) -> ImageGeometry:
        """The geometry of a Hugging Face ViT-like model, from its config.

        Reads ``config.image_size`` and ``config.patch_size`` (a composite
        config such as CLIP's is read through ``config.vision_config``) and
        counts the prefix tokens from ``config.model_type`` (CLS for ViT,
        DINOv2, BEiT, CLIP...; CLS + distillation for DeiT; none for SigLIP
        and I-JEPA) plus ``config.num_register_tokens``. Image processors, not
        configs, hold the normalization: pass ``mean``/``std`` to have it.

        Args:
            config: a ``transformers`` config (or any object with those attributes).
            image_size: the size the model is run at, when not
                ``config.image_size`` (DINOv2's config says 518; it is often
                run at 224): the grid is ``image_size // patch_size``.
            num_prefix_tokens: the prefix count, for a ``model_type`` not known here.
            mean, std: per-channel input normalization.

        Returns:
            an :class:`ImageGeometry`.

        Example:
            >>> from types import SimpleNamespace
            >>> config = SimpleNamespace(model_type="dinov2_with_registers", image_size=518,
            ...                          patch_size=14, num_register_tokens=4)
            >>> geometry = ImageGeometry.from_config(config, image_size=224)
            >>> geometry.grid_size, geometry.num_prefix_tokens, geometry.patch_size
            ((16, 16), 5, (14, 14))
        """
        func = "ImageGeometry.from_config"
        if not hasattr(config, "patch_size") and hasattr(config, "vision_config"):
            config = config.vision_config  # CLIP, SigLIP: the image tower's own config
        model_type = getattr(config, "model_type", None)
        described = f"{type(config).__name__} (model_type {model_type!r})"
        patch = _patch_pair(getattr(config, "patch_size", None), func)
        size = getattr(config, "image_size", None) if image_size is None else image_size
        if patch is None or size is None:
            missing = " and ".join(
                f"config.{name}" for name, value in (("image_size", size), ("patch_size", patch))
                if value is None
            )
            raise VisualizerError(
                f"{func}: cannot infer the patch grid: looked for config.image_size and "
                f"config.patch_size (and config.vision_config) on {described}; {missing} "
                "missing. Build ImageGeometry(grid_size=..., num_prefix_tokens=..., "
                "patch_size=...) yourself"
            )
        grid = _grid_of_image(size, patch, func)
        if num_prefix_tokens is None:
            if model_type not in _HF_PREFIX_TOKENS:
                raise VisualizerError(
                    f"{func}: cannot infer the number of prefix tokens of {described}: "
                    f"looked for its model_type among {sorted(_HF_PREFIX_TOKENS)}; pass "
                    "num_prefix_tokens= (CLS + register tokens before the patches)"
                )
            num_prefix_tokens = _HF_PREFIX_TOKENS[model_type] + int(
                getattr(config, "num_register_tokens", 0) or 0
            )
        return cls(grid, num_prefix_tokens, patch, mean, std)

    @classmethod
    def from_model(
        cls,
        model: Any,
        *,
        image_size: Union[int, tuple[int, int], None] = None,
        num_prefix_tokens: Optional[int] = None,
        mean: Optional[ArrayOrTensor] = None,
        std: Optional[ArrayOrTensor] = None,
    ) -> ImageGeometry:
        """The geometry of a ViT-like model, read from its attributes.

        - A Hugging Face model (it has ``.config``): :meth:`from_config`.
        - A timm-like model: the grid from ``patch_embed.grid_size`` (or
          ``grid_size``, or ``image_size``/``img_size`` over the patch size),
          the patch from ``patch_embed.patch_size`` (or ``patch_size``), the
          prefix count from ``num_prefix_tokens``, else by counting
          ``cls_token``/``class_token``, ``dist_token`` and
          ``reg_token``/``register_tokens`` that are not None; the
          normalization from ``pretrained_cfg`` (or ``default_cfg``)
          ``"mean"``/``"std"``.

        Args:
            model: the model (a ``torch.nn.Module``, or any object with those attributes).
            image_size: the size the model is run at, when not the one it was
                built for: the grid is then ``image_size // patch_size``.
            num_prefix_tokens, mean, std: values to use instead of inferring them.

        Returns:
            an :class:`ImageGeometry`.

        Example:
            >>> from types import SimpleNamespace
            >>> vit = SimpleNamespace(patch_embed=SimpleNamespace(grid_size=(14, 14),
            ...                       patch_size=(16, 16)), num_prefix_tokens=1)
            >>> ImageGeometry.from_model(vit).image_size
            (224, 224)
        """
        func = "ImageGeometry.from_model"
        if getattr(model, "config", None) is not None:
            return cls.from_config(
                model.config,
                image_size=image_size,
                num_prefix_tokens=num_prefix_tokens,
                mean=mean,
                std=std,
            )
        owners = [model, getattr(model, "patch_embed", None)]

        def find(*names: str) -> Any:
            # patch_embed first: timm keeps the geometry there, on the module
            # that makes the patches.
            for owner in reversed(owners):
                for name in names:
                    if owner is not None and getattr(owner, name, None) is not None:
                        return getattr(owner, name)
            return None

        patch = _patch_pair(find("patch_size"), func)
        if image_size is None:
            grid = _grid_pair(_int_pair(find("grid_size"), func), func)
            size = find("img_size", "image_size")
        else:
            grid, size = None, image_size  # run at another size: the grid follows it
        if grid is None and patch is not None and size is not None:
            grid = _grid_of_image(size, patch, func)
        name = type(model).__name__
        if grid is None:
            raise VisualizerError(
                f"{func}: cannot infer the patch grid of {name}: looked for model.config "
                "(Hugging Face), patch_embed.grid_size or grid_size, and image_size or img_size "
                "with patch_size (timm-like); build ImageGeometry(grid_size=...) yourself"
            )
        if num_prefix_tokens is None:
            num_prefix_tokens = _count_prefix_tokens(model, func)
        if num_prefix_tokens is None:
            raise VisualizerError(
                f"{func}: cannot infer the number of prefix tokens of {name}: looked for "
                "num_prefix_tokens, cls_token, class_token, dist_token, reg_token, "
                "register_tokens; pass num_prefix_tokens="
            )
        config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(config, dict):
            mean = config.get("mean") if mean is None else mean
            std = config.get("std") if std is None else std
        return cls(grid, num_prefix_tokens, patch, mean, std)


# Tokens before the patches, per Hugging Face model_type: CLS for most; DeiT
# adds a distillation token; SigLIP and I-JEPA pool the patches and have none.
# Register tokens (config.num_register_tokens) come on top.
_HF_PREFIX_TOKENS = {
    "beit": 1,
    "clip_vision_model": 1,
    "data2vec-vision": 1,
    "deit": 2,
    "dinov2": 1,
    "dinov2_with_registers": 1,
    "dinov3_vit": 1,
    "ijepa": 0,
    "siglip_vision_model": 0,
    "vit": 1,
    "vit_msn": 1,
}


def _int_pair(value: Any, func: str) -> Any:
    """A tensor or array grid size as a tuple of ints; anything else unchanged."""
    if value is None or isinstance(value, (int, tuple, list)):
        return value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = np.asarray(None)  # refused below
    if array.dtype.kind not in "iu":
        raise VisualizerError(
            f"{func}: the model's grid_size must be (h, w), ints; got {value!r}"
        )
    return tuple(int(side) for side in array.ravel())


def _count_prefix_tokens(model: Any, func: str) -> Optional[int]:
    """``model.num_prefix_tokens``, else the prefix token parameters counted; None if neither."""
    declared = getattr(model, "num_prefix_tokens", None)
    if declared is not None:
        try:
            if isinstance(declared, bool):
                raise TypeError
            count = operator.index(declared)  # an int, numpy or torch integer
        except TypeError:
            count = -1
        if count < 0:
            raise VisualizerError(
                f"{func}: the model's num_prefix_tokens must be an int >= 0; got {declared!r}"
            )
        return count
    found = None
    for name in ("cls_token", "class_token", "dist_token", "reg_token", "register_tokens"):
        if not hasattr(model, name):
            continue
        found = found or 0
        token = getattr(model, name)
        if token is not None:
            # (1, count, dim) parameters: registers come several at a time.
            found += int(np.shape(token)[1]) if len(np.shape(token)) == 3 else 1
    return found

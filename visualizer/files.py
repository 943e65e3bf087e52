"""Saving a cache to a file and reading it back, without pickle: `save_cache`, `load_cache`.

The file is an .npz: one array per captured array, and a JSON manifest that
holds the keys, the entries' structure and the values that are not arrays.
"""
import json
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Union

import numpy as np

from ._arrays import check_path, is_torch_tensor
from ._errors import VisualizerError
from .policy import MISSING, NOT_CAPTURED, StoragePolicy
from .snapshot import snapshot_tensor
from .store import BoundedEntries

if TYPE_CHECKING:
    import os

    PathLike = Union[str, "os.PathLike[str]"]

_FORMAT = "visualizer-cache"
_MANIFEST = "__manifest__"


def save_cache(cache: Mapping[str, Any], path: "PathLike") -> None:
    """Write a cache dict to an .npz file, without pickle.

    Arrays and tensors become arrays (bfloat16 as float32, which holds it
    exactly); MISSING, NOT_CAPTURED, None, numbers, strings and lists or tuples of them are
    kept in a JSON manifest stored in the same file.

    Args:
        cache: `get_local.cache` or a dict of the same form.
        path: file to write (written as given; no suffix is added).
    """
    check_path(path, "save_cache")
    if not isinstance(cache, Mapping):
        raise VisualizerError(
            "save_cache: cache must be a dict of key -> list of entries (get_local.cache, "
            f"AttentionMaps); got {type(cache).__qualname__}"
        )
    arrays: Dict[str, np.ndarray] = {}

    def encode(value, where):
        if value is MISSING:
            return {"missing": True}
        if value is NOT_CAPTURED:
            return {"not_captured": True}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"scalar": value}
        if is_torch_tensor(value):
            value = snapshot_tensor(value, StoragePolicy())
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise VisualizerError(
                    f"save_cache: {where} is an object array, which needs pickle; "
                    "expected a numeric array"
                )
            array_key = f"a{len(arrays)}"
            arrays[array_key] = value
            return {"array": array_key}
        if type(value) in (list, tuple):
            items = [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return {type(value).__name__: items}
        raise VisualizerError(
            f"save_cache: {where} is a {type(value).__qualname__}; expected an array, a "
            "tensor, a number, a string, None or a list/tuple of them"
        )

    keys: List[Dict[str, Any]] = []
    manifest = {"format": _FORMAT, "version": 1, "keys": keys}
    for key, entries in cache.items():
        if not isinstance(key, str):
            raise VisualizerError(
                f"save_cache: keys must be strings (function or module names); got {key!r} "
                f"({type(key).__qualname__})"
            )
        if not isinstance(entries, (list, tuple, BoundedEntries)):
            raise VisualizerError(
                f"save_cache: cache[{key!r}] must be a list of entries, one per call; got "
                f"{type(entries).__qualname__}"
            )
        encoded = []
        for index, entry in enumerate(entries):
            where = f"cache[{key!r}][{index}]"
            if isinstance(entry, dict):
                # JSON object keys are strings: a name 1 would load back as "1".
                for name in entry:
                    if not isinstance(name, str):
                        raise VisualizerError(
                            f"save_cache: {where}[{name!r}]: entry names must be strings "
                            f"(variable names); got {type(name).__qualname__}"
                        )
                encoded.append(
                    {"names": {n: encode(v, f"{where}[{n!r}]") for n, v in entry.items()}}
                )
            else:
                encoded.append({"value": encode(entry, where)})
        keys.append({"key": key, "entries": encoded})
    arrays[_MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy's stub: a bool kwarg


def load_cache(path: "PathLike") -> Dict[str, List[Any]]:
    """Read a file written by `save_cache` back into a cache dict of numpy arrays.

    Anything else (another .npz or .npy, a truncated or corrupt file) raises
    VisualizerError naming the file and what was expected.
    """
    check_path(path, "load_cache")
    expected = "expected a file written by save_cache (an .npz with a JSON manifest)"
    # The file is opened here, not by np.load, so that it is closed on every way out:
    # np.load(path) leaves its handle open when the zip directory is unreadable.
    with open(path, "rb") as file:
        try:
            archive = np.load(file, allow_pickle=False)
        except Exception as error:
            raise VisualizerError(
                f"load_cache: {path!r} cannot be read as an .npz ({type(error).__name__}: "
                f"{error}); {expected}"
            ) from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise VisualizerError(
                f"load_cache: {path!r} holds a single {type(archive).__name__}, not an .npz; "
                f"{expected}"
            )
        with archive:
            try:
                return _read_archive(archive, path, expected)
            except VisualizerError:
                raise
            except Exception as error:
                raise VisualizerError(
                    f"load_cache: {path!r} is damaged or not a visualizer cache "
                    f"({type(error).__name__}: {error}); {expected}"
                ) from None


def _read_archive(archive, path, expected):
    if _MANIFEST not in archive.files:
        raise VisualizerError(
            f"load_cache: {path!r} has no {_MANIFEST!r}; {expected}, got an .npz with "
            f"{sorted(archive.files)[:5]}"
        )
    manifest = json.loads(archive[_MANIFEST].tobytes().decode("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise VisualizerError(
            f"load_cache: {path!r} is not a visualizer cache; got format "
            f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r}"
        )

    def decode(encoded):
        if "missing" in encoded:
            return MISSING
        if "not_captured" in encoded:
            return NOT_CAPTURED
        if "scalar" in encoded:
            return encoded["scalar"]
        if "array" in encoded:
            return archive[encoded["array"]]
        if "list" in encoded:
            return [decode(item) for item in encoded["list"]]
        return tuple(decode(item) for item in encoded["tuple"])

    cache = {}
    for record in manifest["keys"]:
        cache[record["key"]] = [
            {n: decode(v) for n, v in entry["names"].items()}
            if "names" in entry
            else decode(entry["value"])
            for entry in record["entries"]
        ]
    return cache

"""save_cache / load_cache as a contract: exact round trips, clear refusals (no torch needed)."""

import copy
import pickle
import zipfile

import numpy as np
import pytest

from visualizer import MISSING, VisualizerError, load_cache, save_cache


def test_round_trip_is_exact_for_every_accepted_type(tmp_path):
    cache = {
        "Attention.forward": [np.arange(6, dtype=np.float16).reshape(1, 2, 3), np.zeros(0)],
        "several": [{"attn": np.ones((2, 2), dtype=np.float32), "layer": 3, "name": "abc"}],
        "scalars": ["abc", "", 1.5, -2, True, None, MISSING],
        "nested": [[1, "x", (2, None)], (np.int64(7).item(), [MISSING])],
    }
    save_cache(cache, tmp_path / "maps.npz")
    loaded = load_cache(tmp_path / "maps.npz")
    assert list(loaded) == list(cache)
    first = loaded["Attention.forward"][0]
    assert first.dtype == np.float16 and np.array_equal(first, cache["Attention.forward"][0])
    assert loaded["several"][0]["name"] == "abc" and loaded["several"][0]["layer"] == 3
    assert loaded["scalars"] == ["abc", "", 1.5, -2, True, None, MISSING]
    assert loaded["scalars"][-1] is MISSING
    assert loaded["nested"] == [[1, "x", (2, None)], (7, [MISSING])]


@pytest.mark.parametrize(
    "cache, message",
    [
        ({("a", 1): [1]}, r"save_cache: keys must be strings .*; got \('a', 1\) \(tuple\)"),
        (
            {"k": "abc"},
            r"save_cache: cache\['k'\] must be a list of entries, one per call; got str",
        ),
        ({"k": [object()]}, r"save_cache: cache\['k'\]\[0\] is a object; expected an array"),
        (
            {"k": [np.array([object()])]},
            r"cache\['k'\]\[0\] is an object array, which needs pickle",
        ),
    ],
)
def test_what_cannot_round_trip_is_refused_at_save(tmp_path, cache, message):
    with pytest.raises(VisualizerError, match=message):
        save_cache(cache, tmp_path / "bad.npz")


def foreign_npz(path):
    np.savez(path, weights=np.zeros(3))


def single_npy(path):
    np.save(path, np.zeros(3))


def random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(2000))


def truncated(path):
    save_cache({"k": [np.zeros((50, 50))]}, path)
    path.write_bytes(path.read_bytes()[:300])


def bad_manifest(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__manifest__.npy", b"not an npy file")


def wrong_format(path):
    manifest = np.frombuffer(b'{"format": "something-else"}', dtype=np.uint8)
    np.savez(path, __manifest__=manifest)


@pytest.mark.parametrize(
    "write, message",
    [
        (foreign_npz, r"has no '__manifest__'; expected a file written by save_cache"),
        (single_npy, r"holds a single ndarray, not an .npz; expected a file written by save_cache"),
        (random_bytes, r"cannot be read as an .npz .*; expected a file written by save_cache"),
        (truncated, r"(cannot be read as an .npz|is damaged or not a visualizer cache)"),
        (bad_manifest, r"is damaged or not a visualizer cache"),
        (wrong_format, r"is not a visualizer cache; got format 'something-else'"),
    ],
)
def test_anything_else_is_refused_at_load_naming_the_file(tmp_path, write, message):
    path = tmp_path / "file.npz"
    write(path)
    if not path.exists():  # np.save adds .npy
        path = tmp_path / "file.npz.npy"
    with pytest.raises(VisualizerError, match=r"load_cache: '.*file.npz.*' " + message):
        load_cache(str(path))


def test_missing_is_a_singleton_through_pickle_and_deepcopy():
    assert pickle.loads(pickle.dumps(MISSING)) is MISSING
    assert copy.deepcopy([MISSING])[0] is MISSING
    assert copy.copy(MISSING) is MISSING

"""Every example runs, writes its figures, and measures attention that random weights do not have.

Each example is run through its `main(argv)` in a temporary folder, in a quick
setting, with a fixed seed. Its returned measure is compared with the same
measure of the same model before training (random weights) and with what
uniform attention would give. Thresholds leave a margin below what these
settings gave over seeds 0-3 (seed 0 is tested): trained, CLS attention on
the object 2.9-3.5x the uniform share (random 1.0-1.4x), rollout 2.0-2.4x
and gradient rollout 4.0-4.5x (random 0.9-1.1x), DETR cross-attention in the
box 4.3-9.0x the box's area share (random 0.9-1.3x), Hugging Face ViT 2.4-3.1x
(random 1.0x); the closest trained head 0.5-1.4 px below the uniform-attention
distance (random heads within 0.2 px of it).
"""
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from examples import (  # noqa: E402
    attention_rollout,
    detr_cross_attention,
    mean_attention_distance,
    vit_walkthrough,
)
from visualizer import get_local  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def capture_off_afterwards():
    yield
    get_local.deactivate()


def assert_explorer(path):
    """An explorer page that opens offline: the whole page, its data and script inline."""
    page = path.read_text(encoding="utf-8")
    assert path.name == "explorer.html" and page.startswith("<!DOCTYPE html>")
    assert "visualizer-explorer-data" in page and "window.visualizerExplorer(" in page
    assert "http://" not in page and "https://" not in page, f"{path} refers to the network"


def assert_pngs(paths, count):
    assert len(paths) == count
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, f"{path} is not a drawn PNG"


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The main job, quick: 2 rounds of 100 steps (~15 s); its checkpoint serves other tests."""
    out = tmp_path_factory.mktemp("vit_walkthrough")
    return vit_walkthrough.main(["--out", str(out), "--steps", "100", "--seed", "0"])


def test_walkthrough_cls_attention_lands_on_the_object_after_training(walkthrough):
    shares = walkthrough["shares"]
    assert sorted(shares) == [0, 100, 200]
    before, after = shares[0], shares[200]
    assert before.uniform == after.uniform and 0.05 < after.uniform < 0.3
    assert before.on_object < 1.6 * before.uniform, f"random weights: {before}"
    assert after.on_object > 2.0 * after.uniform, f"trained: {after}"
    assert after.on_object > before.on_object + 0.15, f"{before} -> {after}"
    assert after.accuracy > 0.5


def test_walkthrough_draws_every_figure_at_every_stage(walkthrough):
    assert_pngs(walkthrough["figures"], 6 * 3)
    names = {path.name for path in walkthrough["figures"]}
    for stage in (0, 100, 200):
        for figure in ("head", "heads_first_layer", "heads_last_layer", "query", "query_with_cls"):
            assert f"{figure}_step{stage}.png" in names
        assert f"cls_attention_step{stage}.png" in names
    assert walkthrough["checkpoint"].stat().st_size > 0
    assert_explorer(walkthrough["explorer"])


def test_mean_attention_distance_moves_below_uniform_only_when_trained(walkthrough, tmp_path):
    result = mean_attention_distance.main(
        ["--out", str(tmp_path), "--checkpoint", str(walkthrough["checkpoint"])]
    )
    assert_pngs(result["figures"], 1)
    uniform = result["references"]["uniform over the image"]
    object_only = result["references"]["uniform over the object"]
    local = result["references"]["uniform over the 3x3 neighbours"]
    assert local < object_only < uniform
    assert result["random"].shape == result["trained"].shape == (3, 4)
    # Random attention is nearly uniform; trained heads look at the object.
    assert abs(result["random"] - uniform).max() < 0.3
    assert result["trained"].min() < uniform - 0.45


def test_rollouts_attribute_the_class_to_the_object_only_when_trained(walkthrough, tmp_path):
    result = attention_rollout.main(
        ["--out", str(tmp_path), "--checkpoint", str(walkthrough["checkpoint"]), "--images", "3"]
    )
    assert_pngs(result["figures"], 1)
    shares, uniform = result["shares"], result["uniform"]
    for kind in ("attention rollout", "gradient rollout"):
        assert shares["random", kind] < 1.4 * uniform, (kind, shares)
        assert shares["trained", kind] > 1.6 * uniform, (kind, shares)
        assert shares["trained", kind] > shares["random", kind] + 0.1, (kind, shares)


@pytest.mark.parametrize("example", [mean_attention_distance, attention_rollout])
def test_examples_run_standalone_training_their_own_vit(example, tmp_path, capsys):
    result = example.main(["--out", str(tmp_path), "--steps", "20"])
    assert_pngs(result["figures"], 1)
    assert "training the ViT for 20 steps" in capsys.readouterr().out


def test_detr_queries_attend_inside_their_boxes_after_training(tmp_path):
    result = detr_cross_attention.main(["--out", str(tmp_path), "--steps", "300", "--seed", "0"])
    assert_pngs(result["figures"], 1)
    before, after = result["before"], result["after"]
    area = after["area"].mean()
    assert 0.02 < area < 0.1
    assert before["inside"].mean() < 2 * area, before["inside"]
    assert after["inside"].mean() > 3 * area, after["inside"]
    assert after["inside"].min() > 2 * area, after["inside"]  # every query, not only on average
    assert after["inside"].mean() > before["inside"].mean() + 0.1
    assert after["iou"] > before["iou"] + 0.2
    assert_explorer(result["explorer"])


def test_token_example_writes_its_explorer(tmp_path):
    from examples import token_attention

    result = token_attention.main(["--out", str(tmp_path), "--steps", "20", "--held-out", "16"])
    assert_explorer(result["explorer"])


def test_huggingface_captures_equal_output_attentions_and_mean_something(tmp_path):
    pytest.importorskip("transformers")
    from examples import huggingface_capture

    result = huggingface_capture.main(["--out", str(tmp_path), "--steps", "300", "--seed", "0"])
    assert_pngs(result["figures"], 2)
    assert result["eager_difference"] == 0.0  # the very tensor transformers returns
    assert result["fused_difference"] < 1e-5  # recomputed from q and k
    before, after = result["before"], result["after"]
    assert before.on_object < 1.4 * before.uniform, before
    assert after.on_object > 1.8 * after.uniform, after
    assert after.on_object > before.on_object + 0.1

"""Regenerate the README gallery: examples/gallery/*.png and its README section.

    python examples/make_gallery.py         # ~1 minute on two CPU cores
    python examples/make_gallery.py --readme /tmp/README.md   # rewrite another copy's section

Runs every example with its default settings (the mean-attention-distance and
rollout examples on the walkthrough's checkpoint), copies the figures worth
showing into examples/gallery/ and rewrites the README's gallery section (between
its gallery markers) with the measures the run printed: the captions cannot
drift from the pictures.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see vit_walkthrough.py

from examples import (  # noqa: E402
    attention_rollout,
    detr_cross_attention,
    huggingface_capture,
    mean_attention_distance,
    token_attention,
    vit_walkthrough,
)

ROOT = Path(__file__).resolve().parents[1]
GALLERY = ROOT / "examples" / "gallery"
COMMAND = "python examples/make_gallery.py"
README = ROOT / "README.md"
START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"


def run_examples(work):
    """Run each example into its own folder under ``work``; return their results."""
    walkthrough = vit_walkthrough.main(["--out", str(work / "vit_walkthrough")])
    checkpoint = str(walkthrough["checkpoint"])
    return {
        "walkthrough": walkthrough,
        "distance": mean_attention_distance.main(
            ["--out", str(work / "mad"), "--checkpoint", checkpoint]
        ),
        "rollout": attention_rollout.main(
            ["--out", str(work / "rollout"), "--checkpoint", checkpoint]
        ),
        "detr": detr_cross_attention.main(["--out", str(work / "detr")]),
        "huggingface": huggingface_capture.main(["--out", str(work / "hf")]),
        "tokens": token_attention.main(["--out", str(work / "tokens")]),
    }


def entries(results):
    """``(gallery file name, source figure, one-line caption quoting measures)`` per picture."""
    figure = {path.name: path for result in results.values() for path in result["figures"]}
    shares = results["walkthrough"]["shares"]
    step = max(shares)
    before, after = shares[0], shares[step]
    distance = results["distance"]
    uniform_px = distance["references"]["uniform over the image"]
    rollout, rollout_uniform = results["rollout"]["shares"], results["rollout"]["uniform"]
    detr_before, detr_after = results["detr"]["before"], results["detr"]["after"]
    hf = results["huggingface"]
    tokens = results["tokens"]
    return [
        (
            "cls_attention_random.png",
            figure["cls_attention_step0.png"],
            (
                f"Random weights: last-layer CLS attention per head, DINO's 60%-mass masks shaded; "
                f"{before.on_object:.0%} on the object, uniform share {before.uniform:.0%}."
            ),
        ),
        (
            "cls_attention_trained.png",
            figure[f"cls_attention_step{step}.png"],
            (
                f"After {step} training steps: {after.on_object:.0%} on the object "
                f"({after.on_object / after.uniform:.1f}x uniform), held-out accuracy "
                f"{after.accuracy:.0%}."
            ),
        ),
        (
            "head.png",
            figure[f"head_step{step}.png"],
            "One head of the last layer: every query reads the same keys, the object's patches.",
        ),
        (
            "heads.png",
            figure[f"heads_last_layer_step{step}.png"],
            "All heads of the last layer, and their mean.",
        ),
        (
            "query_attention.png",
            figure[f"query_with_cls_step{step}.png"],
            "Where the patch under the object's centre looks, and the weight it gives CLS.",
        ),
        (
            "mean_attention_distance.png",
            figure["mean_attention_distance.png"],
            (
                f"Mean attention distance: random heads sit at the uniform {uniform_px:.1f} px, "
                f"trained ones up to {uniform_px - distance['trained'].min():.1f} px below it, "
                f"toward the object; none is local."
            ),
        ),
        (
            "rollout.png",
            figure["rollout.png"],
            (
                f"Rollout / gradient rollout: {rollout['trained', 'attention rollout']:.0%} / "
                f"{rollout['trained', 'gradient rollout']:.0%} on the object (random weights "
                f"{rollout['random', 'attention rollout']:.0%} / "
                f"{rollout['random', 'gradient rollout']:.0%}, uniform {rollout_uniform:.0%})."
            ),
        ),
        (
            "detr_cross_attention.png",
            figure["cross_attention.png"],
            (
                f"DETR object queries: {detr_after['inside'].mean():.0%} of cross-attention inside "
                f"the query's box, which covers {detr_after['area'].mean():.0%} of the image "
                f"(random weights {detr_before['inside'].mean():.0%})."
            ),
        ),
        (
            "huggingface_sdpa.png",
            figure["hf_cls_attention_sdpa.png"],
            (
                f'transformers ViT, attn_implementation="sdpa", capture_attention: '
                f"{hf['after'].on_object:.0%} of CLS attention on the object (random weights "
                f"{hf['before'].on_object:.0%})."
            ),
        ),
        (
            "token_attention.png",
            figure["token_attention.png"],
            (
                f"A one-block transformer learns to reverse its input: `plot.tokens` of its best "
                f"head, {tokens['before'].on_rule.max():.0%} of attention on the anti-diagonal "
                f"with random weights (uniform {tokens['uniform']:.1%}), "
                f"{tokens['after'].on_rule.max():.0%} after training."
            ),
        ),
        (
            "head_view.png",
            figure["head_view.png"],
            (
                "The same sequence in `plot.head_view` (BertViz's lines, opacity = weight): "
                "every query token reads the key at the mirrored position."
            ),
        ),
    ]


def measures(results):
    """The numbers each example printed, as markdown list items."""
    shares = results["walkthrough"]["shares"]
    distance = results["distance"]
    detr = results["detr"]
    hf = results["huggingface"]
    tokens = results["tokens"]
    walkthrough = " -> ".join(
        f"{share.on_object:.1%} (step {step})" for step, share in sorted(shares.items())
    )
    per_layer = "; ".join(
        f"layer {layer} {row.min():.1f}-{row.max():.1f} px"
        for layer, row in enumerate(distance["trained"])
    )
    return [
        (
            f"- ViT walkthrough: last-layer CLS attention on the object {walkthrough}; "
            f"uniform share {shares[0].uniform:.1%}."
        ),
        f"- Mean attention distance, trained heads: {per_layer}. References: "
        + ", ".join(f"{name} {value:.1f} px" for name, value in distance["references"].items())
        + ".",
        f"- DETR: box IoU {detr['before']['iou']:.2f} -> {detr['after']['iou']:.2f}; "
        f"cross-attention inside the box per query "
        + ", ".join(f"{share:.0%}" for share in detr["after"]["inside"])
        + ".",
        (
            f"- Hugging Face ViT: captured maps differ from `output_attentions` by "
            f"{hf['eager_difference']:.1e} (eager, instrumented in place) and "
            f"{hf['fused_difference']:.1e} (sdpa, capture_attention)."
        ),
        (
            "- Sequence reversal: attention on the anti-diagonal per head "
            + ", ".join(f"{share:.1%}" for share in tokens["before"].on_rule)
            + " -> "
            + ", ".join(f"{share:.1%}" for share in tokens["after"].on_rule)
            + f" (uniform {tokens['uniform']:.1%}); reversal accuracy "
            f"{tokens['before'].accuracy:.0%} -> {tokens['after'].accuracy:.0%}."
        ),
    ]


def markdown(items, results):
    lines = [
        "## Gallery",
        "",
        (
            "Every model here was trained on CPU in seconds on drawn shapes (no downloads); every "
            "caption quotes what its example measured. Regenerate pictures and captions with "
            f"`{COMMAND}`."
        ),
        "",
    ]
    for name, _, caption in items:
        lines += [f"![{name[:-4]}](examples/gallery/{name})", "", caption, ""]
    lines += ["Printed by the examples in that run:", "", *measures(results), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--readme", type=Path, default=README, help="markdown file whose gallery section to rewrite"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        results = run_examples(Path(work))
        items = entries(results)
        if GALLERY.exists():
            shutil.rmtree(GALLERY)
        GALLERY.mkdir(parents=True)
        for name, source, _ in items:
            shutil.copyfile(source, GALLERY / name)
    write_readme_section(markdown(items, results), args.readme)
    size = sum(path.stat().st_size for path in GALLERY.iterdir())
    print(
        f"wrote {len(items)} pictures to {GALLERY} ({size / 1e3:.0f} kB) and the gallery "
        f"section of {args.readme}"
    )


def write_readme_section(section, readme):
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"make_gallery: {readme} lacks the markers {START} ... {END}")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{section}{END}{after}")


if __name__ == "__main__":
    main()

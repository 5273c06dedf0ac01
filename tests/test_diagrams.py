"""The diagrams drawn by code: they draw, and say what the chapter says they say."""
import matplotlib

matplotlib.use("Agg")

from qlora_tutorial.diagrams import qlora_layer_diagram  # noqa: E402


def test_layer_diagram_labels_the_dtypes_and_the_backward_pass():
    fig = qlora_layer_diagram(compute_dtype="bfloat16")
    texts = " | ".join(t.get_text() for t in fig.axes[0].texts)
    for needle in ("packed weight W", "uint8", "dequantize", "bfloat16", "W_a (in x r)", "@ W_b",
                   "dL/dx = dL/dy @ W", "kept by autograd for backward", "alpha / r"):
        assert needle in texts, needle
    assert "float16" not in texts.replace("bfloat16", "")


def test_layer_diagram_text_stays_in_its_box_and_off_the_others():
    """Every text either sits wholly inside one box (a box's own text) or touches no box (arrow labels,
    the legend), and no two texts overlap: the drawing reads as drawn."""
    from matplotlib.patches import FancyBboxPatch

    fig = qlora_layer_diagram(compute_dtype="bfloat16")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_text().strip()]
    boxes = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, FancyBboxPatch)]
    for i, (text, extent) in enumerate(texts):
        for other, other_extent in texts[i + 1:]:
            assert not extent.overlaps(other_extent), (text, other)
        touched = [b for b in boxes if b.overlaps(extent)]
        assert len(touched) <= 1, text
        for box in touched:
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, text

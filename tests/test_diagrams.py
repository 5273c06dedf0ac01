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

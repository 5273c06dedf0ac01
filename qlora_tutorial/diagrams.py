"""Diagrams the book draws with code (matplotlib), so that a figure and the code it explains cannot drift apart.

``qlora_layer_diagram`` draws one QLoRA layer: what is stored in which dtype, the dequantize -> matmul
path of the frozen base, the LoRA branch, what autograd keeps for the backward pass, and the gradient
that flows back to the input through the frozen, dequantized weight.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# Colours by role, used in the legend too.
STORED = "#d9e7f5"     # lives in memory the whole time (packed weight, adapters)
TEMPORARY = "#fdf1d6"  # exists only inside one forward or backward call
SAVED = "#c0392b"      # outline: kept by autograd between forward and backward
BACKWARD = "#c0392b"   # arrows of the backward pass


def _box(ax, x, y, w, h, text, face, saved=False, fontsize=9):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=face, edgecolor=SAVED if saved else "#444444",
                                linewidth=2.2 if saved else 1.0, linestyle="--" if saved else "-"))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, color="#333333", style="-|>", dashed=False, rad=0.0, label=None, label_at=0.5,
           label_offset=(0.0, 0.12)):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, linewidth=1.4,
                                 linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=2, shrinkB=2))
    if label:
        lx = start[0] + label_at * (end[0] - start[0]) + label_offset[0]
        ly = start[1] + label_at * (end[1] - start[1]) + label_offset[1]
        ax.text(lx, ly, label, ha="center", va="bottom", fontsize=8, color=color)


def qlora_layer_diagram(storage: str = "uint8, 2 NF4 codes a byte", compute_dtype: str = "bfloat16",
                        adapter_dtype: str = "float32", ax=None):
    """Draw one QLoRA layer, forward (black) and backward (red); return the figure.

    ``storage``, ``compute_dtype`` and ``adapter_dtype`` are the labels printed in the boxes (pass the
    dtypes of the layer you are looking at).
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 5.6))
    else:
        fig = ax.figure
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 6.2)
    ax.axis("off")

    # Forward, base path (top row): packed weight -> dequantize -> matmul.
    _box(ax, 1.3, 5.2, 2.4, 0.9, f"packed weight W\n{storage}\n+ absmax per block of 64", STORED, saved=True)
    _box(ax, 4.0, 5.2, 2.1, 0.9, f"dequantize\nW = code[q] x absmax\n({compute_dtype}, temporary)", TEMPORARY)
    _box(ax, 1.3, 3.2, 2.3, 0.9, f"input x\n(tokens x in)\n{compute_dtype}", STORED, saved=True)
    _box(ax, 6.6, 4.2, 1.9, 0.8, f"x @ W^T\nmatmul in {compute_dtype}", TEMPORARY)
    _arrow(ax, (2.5, 5.2), (2.95, 5.2))
    _arrow(ax, (5.05, 5.0), (5.85, 4.45))
    _arrow(ax, (2.45, 3.35), (5.65, 4.1))

    # Forward, LoRA branch (bottom row): x -> W_a -> W_b -> scale.
    _box(ax, 4.0, 1.9, 2.1, 0.9, f"W_a (in x r)\n{adapter_dtype}, trains\ncast to {compute_dtype}", STORED)
    _box(ax, 6.75, 1.9, 2.3, 0.9, "x W_a  (tokens x r)\nkept: W_b's gradient\n@ W_b (r x out), trains", STORED,
         saved=True)
    _box(ax, 8.7, 1.9, 1.1, 0.7, "x s\n(alpha / r)", TEMPORARY)
    _arrow(ax, (2.0, 2.75), (2.95, 2.1))
    _arrow(ax, (5.05, 1.9), (5.6, 1.9))
    _arrow(ax, (7.9, 1.9), (8.15, 1.9))

    # Sum and output.
    _box(ax, 9.2, 3.3, 0.6, 0.6, "+", "white", fontsize=13)
    _box(ax, 10.3, 3.3, 1.2, 0.8, f"y\n{compute_dtype}", STORED)
    _arrow(ax, (7.55, 4.1), (8.9, 3.45))
    _arrow(ax, (8.8, 2.25), (9.1, 3.0))
    _arrow(ax, (9.5, 3.3), (9.7, 3.3))

    # Backward (red, dashed): dL/dy -> dL/dx through the frozen, dequantized weight; and into the adapters.
    _arrow(ax, (9.95, 3.75), (4.6, 4.6), color=BACKWARD, dashed=True, rad=0.25,
           label="dL/dy", label_at=0.15, label_offset=(0.25, 0.25))
    _arrow(ax, (3.3, 4.65), (2.2, 3.7), color=BACKWARD, dashed=True,
           label="dL/dx = dL/dy @ W\n(W dequantized again;\nno gradient for W itself)", label_at=0.5,
           label_offset=(1.15, -0.33))
    _arrow(ax, (10.1, 2.9), (7.3, 1.4), color=BACKWARD, dashed=True, rad=-0.55,
           label="dL/dW_b, dL/dW_a", label_at=0.0, label_offset=(0.25, -1.7))

    # Legend.
    items = [(STORED, "-", "#444444", "in memory for the whole step"),
             (TEMPORARY, "-", "#444444", "temporary, inside one call"),
             ("white", "--", SAVED, "kept by autograd for backward")]
    for i, (face, style, edge, text) in enumerate(items):
        x0 = 0.3 + 3.0 * i
        ax.add_patch(FancyBboxPatch((x0, 0.25), 0.45, 0.3, boxstyle="round,pad=0.02", facecolor=face,
                                    edgecolor=edge, linestyle=style, linewidth=2 if style == "--" else 1))
        ax.text(x0 + 0.6, 0.4, text, va="center", fontsize=8.5)
    ax.text(10.7, 0.4, "red: backward", color=BACKWARD, va="center", ha="right", fontsize=8.5)
    return fig

"""LoRA's math, in the original README's layout. Every other module (the layer, the model walker, the adapter
files) uses these functions instead of writing the formulas again.

A frozen weight W0 (out x in, as nn.Linear stores it) is adapted by a rank-r product:

    y = x W0^T + s * (x @ W_a) @ W_b,      W_a: (in, r),  W_b: (r, out),  s = alpha / r

so the effective weight is W0 + s * (W_a @ W_b)^T. PEFT stores the same two matrices transposed:
lora_A.weight = W_a.T with shape (r, in) and lora_B.weight = W_b.T with shape (out, r).

What is here:

* the scale s: ``lora_scale`` (alpha / r, or rsLoRA's alpha / sqrt(r)) and ``check_rank_alpha``;
* the start: ``init_lora_`` (A Kaiming-uniform with fan_in = in_features, B = 0), ``kaiming_bound``;
* the update: ``delta_weight``, ``lora_forward``, ``merge_weight`` / ``unmerge_weight``;
* DoRA's form of the update (a direction and a length per output row): ``dora_magnitude``,
  ``dora_factor``, ``dora_output``, ``dora_merged_weight``;
* how much of a given update a rank r can hold: ``rank_energy``, ``low_rank_factors``;
* counting: ``lora_param_count`` for one layer, ``lora_targets`` / ``count_lora_params`` for a whole
  model (meta-device models work: only ``in_features`` / ``out_features`` are read), and the
  target-name presets ``TARGET_PRESETS``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# Layer names of Llama-style models (Llama, TinyLlama, SmolLM2, Mistral, Qwen2, ...).
# "all" is every linear layer inside the decoder blocks; like PEFT's "all-linear" it leaves out lm_head.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


# ---------------------------------------------------------------- scale
def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """The factor in front of the low-rank update: alpha / r, or alpha / sqrt(r) for rsLoRA.

    With alpha / r and a fixed alpha, doubling r halves s; rsLoRA (Kalajdzievski, 2023) divides by
    sqrt(r) instead so that the size of the update no longer shrinks as r grows.
    """
    check_rank_alpha(r, alpha)
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_rank_alpha(r, alpha) -> None:
    """Raise ValueError unless r is a positive int and alpha a positive finite number."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive finite number, got {alpha!r}")


def _check_factors(W_a: torch.Tensor, W_b: torch.Tensor) -> None:
    if W_a.dim() != 2 or W_b.dim() != 2:
        raise ValueError(f"W_a and W_b must be 2-D, got shapes {tuple(W_a.shape)} and {tuple(W_b.shape)}")
    if W_a.shape[1] != W_b.shape[0]:
        raise ValueError(
            f"W_a {tuple(W_a.shape)} and W_b {tuple(W_b.shape)} do not share the rank: the layout is "
            "W_a (in, r), W_b (r, out) (PEFT's lora_A.weight is W_a.T, lora_B.weight is W_b.T)"
        )


# ---------------------------------------------------------------- init
def init_lora_(W_a: torch.Tensor, W_b: torch.Tensor) -> None:
    """Initialise in place as PEFT and loralib do: A Kaiming-uniform, B zero.

    B = 0 makes the adapted layer start exactly equal to the frozen one; A random (not zero) lets the
    gradient reach B on the first step (if both were zero, both gradients would be zero forever).

    PEFT calls ``kaiming_uniform_(lora_A.weight, a=sqrt(5))`` on a tensor shaped (r, in), so the
    fan-in is ``in_features`` and the bound is sqrt(6 / ((1 + 5) * in)) = 1 / sqrt(in).
    Our W_a is shaped (in, r): calling kaiming_uniform_ on it directly would take fan_in = r and
    draw values sqrt(in / r) times too large. Initialising its transpose keeps PEFT's bound.
    """
    _check_factors(W_a, W_b)
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(W_a.T, a=math.sqrt(5))  # W_a.T is (r, in): fan_in = in
        torch.nn.init.zeros_(W_b)


def kaiming_bound(fan_in: int) -> float:
    """The uniform bound kaiming_uniform_(a=sqrt(5)) uses for a given fan-in: 1 / sqrt(fan_in).

    gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), std = gain / sqrt(fan_in), bound = sqrt(3) * std.
    """
    if not isinstance(fan_in, int) or isinstance(fan_in, bool) or fan_in <= 0:
        raise ValueError(f"fan_in must be a positive integer, got {fan_in!r}")
    return math.sqrt(6.0 / ((1 + 5) * fan_in))


# ---------------------------------------------------------------- the update
def delta_weight(W_a: torch.Tensor, W_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The update to nn.Linear's (out, in) weight: s * (W_a @ W_b)^T."""
    _check_factors(W_a, W_b)
    return scale * (W_a @ W_b).T


def lora_forward(x: torch.Tensor, W_a: torch.Tensor, W_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The low-rank branch alone: s * (x @ W_a) @ W_b, adapters cast to the input's dtype.

    Two thin matmuls, r * (in + out) multiply-adds per token, instead of forming the (out, in) update.
    """
    if x.shape[-1] != W_a.shape[0]:
        raise ValueError(f"input has {x.shape[-1]} features but W_a is {tuple(W_a.shape)} (in, r)")
    return scale * ((x @ W_a.to(x.dtype)) @ W_b.to(x.dtype))


def _check_weight(W: torch.Tensor, W_a: torch.Tensor, W_b: torch.Tensor) -> None:
    _check_factors(W_a, W_b)
    expected = (W_b.shape[1], W_a.shape[0])
    if tuple(W.shape) != expected:
        raise ValueError(f"weight {tuple(W.shape)} does not fit W_a {tuple(W_a.shape)} / W_b {tuple(W_b.shape)}: "
                         f"expected (out, in) = {expected}")


def merge_weight(W0: torch.Tensor, W_a: torch.Tensor, W_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 + s * (W_a @ W_b)^T, computed in float32 and returned in W0's dtype.

    The merged layer is an ordinary (out, in) linear layer again: no extra work at inference.
    """
    _check_weight(W0, W_a, W_b)
    return (W0.float() + delta_weight(W_a.float(), W_b.float(), scale)).to(W0.dtype)


def unmerge_weight(W: torch.Tensor, W_a: torch.Tensor, W_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Undo ``merge_weight``: W - s * (W_a @ W_b)^T (exact up to the rounding of W's dtype)."""
    _check_weight(W, W_a, W_b)
    return (W.float() - delta_weight(W_a.float(), W_b.float(), scale)).to(W.dtype)


# ---------------------------------------------------------------- DoRA: the update as a direction and a length
# DoRA (Liu et al. 2024) splits the adapted weight into a direction and a length per output row,
#
#     W' = m * (W0 + s * dW) / ||W0 + s * dW||_row,      dW = (W_a @ W_b)^T,
#
# and trains the length m (one number per output feature, initialised to ||W0||_row) beside W_a and
# W_b. As the paper suggests (section 4.3) and PEFT does, the norm is treated as a constant in
# backward, so no gradient flows through it.
def dora_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """DoRA's initial magnitude: the L2 norm of each output row of the (out, in) weight, float32."""
    return torch.linalg.norm(weight.float(), dim=1)


def dora_factor(magnitude: torch.Tensor, base_weight: torch.Tensor, W_a: torch.Tensor, W_b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """m / ||W0 + s * dW||_row, one number per output feature; the norm is detached (no gradient).

    Computed in the base weight's dtype, as PEFT does (its ``DoraLinearLayer`` casts both weights
    to the input's dtype first).
    """
    with torch.no_grad():
        update = delta_weight(W_a.detach().to(base_weight.dtype), W_b.detach().to(base_weight.dtype), scale)
        norm = torch.linalg.norm(base_weight + update, dim=1)
    return magnitude / norm


def dora_output(base_out: torch.Tensor, bias: torch.Tensor | None, lora_out: torch.Tensor,
                factor: torch.Tensor) -> torch.Tensor:
    """DoRA's layer output from the plain base output (bias included) and the LoRA branch's s * x A B:

        factor * (W0 x + s * x A B) + bias  =  base_out + (factor - 1) * (base_out - bias) + factor * lora_out

    (the second form reuses the base's output instead of a second matmul with W0, as PEFT does).
    """
    without_bias = base_out if bias is None else base_out - bias.to(base_out.dtype)
    return base_out + (factor - 1) * without_bias + factor * lora_out


def dora_merged_weight(base_weight: torch.Tensor, W_a: torch.Tensor, W_b: torch.Tensor, scale: float,
                       magnitude: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight a DoRA layer computes with, in float32: m * (W0 + s dW) / ||W0 + s dW||_row."""
    W = base_weight.float() + delta_weight(W_a.detach().float(), W_b.detach().float(), scale)
    return (magnitude.detach().float() / torch.linalg.norm(W, dim=1)).unsqueeze(1) * W


# ---------------------------------------------------------------- how much a rank r can hold
def rank_energy(delta: torch.Tensor) -> torch.Tensor:
    """Fraction of ||delta||_F^2 that the best rank-k approximation keeps, for k = 1 .. min(out, in).

    By Eckart-Young the best rank-k approximation keeps the k largest singular values, so entry k-1
    is (s_1^2 + ... + s_k^2) / (s_1^2 + ... + s_n^2). A rank-k LoRA can represent at most that much.
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be a 2-D (out, in) matrix, got shape {tuple(delta.shape)}")
    s2 = torch.linalg.svdvals(delta.detach().double()) ** 2
    total = s2.sum()
    if total == 0:
        raise ValueError("delta is all zeros: it has no energy to split by rank")
    return (s2.cumsum(0) / total).float()


def low_rank_factors(delta: torch.Tensor, r: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W_a (in, r), W_b (r, out) with delta_weight(W_a, W_b, scale) = the best rank-r approximation of delta.

    Truncated SVD, delta ~ U_r S_r V_r^T, split evenly: W_a = V_r sqrt(S_r / s), W_b = sqrt(S_r / s) U_r^T.
    """
    check_rank_alpha(r, 1)
    if delta.dim() != 2:
        raise ValueError(f"delta must be a 2-D (out, in) matrix, got shape {tuple(delta.shape)}")
    if r > min(delta.shape):
        raise ValueError(f"rank r={r} exceeds min(out, in) = {min(delta.shape)} of delta {tuple(delta.shape)}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    U, S, Vh = torch.linalg.svd(delta.detach().float(), full_matrices=False)
    root = (S[:r] / scale).sqrt()
    return Vh[:r].T * root, root[:, None] * U[:, :r].T


# ---------------------------------------------------------------- counting
def lora_param_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters LoRA adds to one (in -> out) linear layer: r * (in + out)."""
    return r * (in_features + out_features)


def resolve_target_names(targets) -> tuple[str, ...]:
    """A preset name ("mlp", "attention", "all") or an iterable of layer names -> a tuple of names."""
    if isinstance(targets, str):
        return TARGET_PRESETS.get(targets, (targets,))
    if not isinstance(targets, Iterable):
        raise TypeError(f"targets must be a preset name {sorted(TARGET_PRESETS)} or a list of layer names, "
                        f"got {type(targets).__name__}")
    names = tuple(targets)
    if not names:
        raise ValueError("targets is empty: name at least one layer, e.g. TARGET_PRESETS['mlp']")
    for name in names:
        if not isinstance(name, str) or not name.strip("."):
            raise ValueError(f"each target must be a non-empty layer name (str), got {name!r}")
    return names


def target_matches(qualified_name: str, target: str) -> bool:
    """A target names a module by its own name ('gate_proj') or a dotted tail ('mlp.gate_proj')."""
    return qualified_name == target or qualified_name.endswith("." + target)


def lora_targets(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """The (qualified name, nn.Linear) pairs that ``targets`` selects in ``model``, in model order.

    Raises ValueError naming the linear layers that exist when a target matches none of them.
    """
    names = resolve_target_names(targets)
    linears = [(q, m) for q, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        if not any(target_matches(q, name) for q, _ in linears):
            existing = sorted({q.rsplit(".", 1)[-1] for q, _ in linears})
            raise ValueError(f"target {name!r} matches no nn.Linear in the model; its linear layers are "
                             f"named {existing}")
    return [(q, m) for q, m in linears if any(target_matches(q, name) for name in names)]


def count_lora_params(model: nn.Module, targets, r: int) -> int:
    """Trainable parameters a rank-r LoRA on ``targets`` adds to ``model``: sum of r * (in + out).

    Reads only ``in_features`` / ``out_features``, so it works on ``meta``-device models and on
    bitsandbytes layers whose packed weight reports half the logical numel.
    """
    check_rank_alpha(r, 1)
    return sum(lora_param_count(m.in_features, m.out_features, r) for _, m in lora_targets(model, targets))

"""AdaLoRA (Zhang et al. 2023) on the book's layer: a rank budget that moves to where it helps.

LoRA gives every layer the same rank r. AdaLoRA starts every layer at ``init_r`` and, while it trains,
takes rank away from the layers that need it least, until the model holds ``target_r`` per layer on
average. Everything here follows PEFT's ``AdaLoraModel`` (peft/tuners/adalora), number for number; the
package tests train both side by side.

**The SVD-like form.** Each update is written as P Λ Q, three trainable pieces that look like a
singular value decomposition of the (out, in) update:

    dW = P Λ Q * alpha / (init_r + 1e-5),     y = base(x) + ((x @ W_a) * E) @ W_b * alpha / (init_r + 1e-5)

with Q the right "singular vectors", Λ = diag(E) the "singular values" and P the left ones. We keep
the original README's layout: ``W_a`` = Q^T (in, r), ``E`` (r,), ``W_b`` = P^T (r, out). PEFT stores
the same tensors as ``lora_A`` = Q (r, in), ``lora_E`` = E as (r, 1), ``lora_B`` = P (out, r). Unlike
LoRA's B, it is E that starts at zero (P and Q are drawn from N(0, 0.02^2)), so the layer starts
equal to its base. Removing rank i is then one number: E[i] = 0 (P and Q stay; the scale keeps
dividing by ``init_r``, as in PEFT). P and Q are only *pushed* towards orthonormal columns and rows by
a penalty added to the loss (``orth_regularization``), so the triplets stay roughly independent.

**The importance score.** After each backward pass, every trainable entry w gets the sensitivity
|w * grad w| (how much the loss would change if w were set to zero), smoothed by an exponential
moving average (``beta1``), times an uncertainty term, the moving average (``beta2``) of how far the
current sensitivity is from its average. A triplet's score is E[i]'s score plus the mean score of
column i of W_a and of row i of W_b (``RankAllocator.mask_to_budget``).

**The budget schedule.** For ``tinit`` steps nothing is pruned; then the total budget (the number of
triplets kept in the whole model) falls along a cubic curve from ``init_r`` to ``target_r`` per layer,
reaching it at step ``total_step - tfinal``; every ``deltaT`` steps the lowest-scored triplets
beyond the budget get E[i] = 0. At step ``total_step - tfinal`` the pattern is fixed, and from then
on it is applied after every step (``update_and_allocate``). A pruned E[i] can grow back between two
prunings (it still gets a gradient); only the final pattern is applied at every step.

Use it as PEFT's: ``adalora_model(model, targets, total_step=..., ...)``, then in each step
``loss.backward(); optimizer.step(); update_and_allocate(model, step); optimizer.zero_grad()``
with steps counted from 0, or ``make_trainer(...)`` plus ``trainer.add_callback(AdaLoraCallback())``.
``model(**batch).loss`` already holds the orthogonality penalty, as PEFT's does. Saving, loading,
PEFT export/import and merging are at the end of this module.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .adapters.folder import FORMAT_VERSION, cpu_copy, read_folder, write_folder
from .adapters.merge import _parent, merged_linear
from .adapters.ours import CONFIG_FILE, WEIGHTS_FILE, base_model_id, base_settings
from .adapters.peft_format import (PEFT_CONFIG_FILE, PEFT_IRRELEVANT, PEFT_PREFIX, PEFT_REASONS, PEFT_WEIGHTS_FILE,
                                   _neutral, _peft_targeted, _peft_targets)
from .layer import Qlora_4_bit, check_plain_linear, check_weight_to_wrap
from .lora import lora_targets
from .quantize import _check_not_prequantized, guard_save_pretrained, name_list, unchanged_on_error, wrapped_layers

FORMAT = "qlora_tutorial.adalora"
ATTRIBUTE = "adalora"  # model.adalora: the RankAllocator of an AdaLoRA model
EPS = 1e-5  # PEFT divides by ranknum + 1e-5


# ---------------------------------------------------------------- settings
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AdaLoraSettings:
    """AdaLoRA's numbers, checked when made (PEFT's ``AdaLoraConfig`` fields, PEFT's defaults).

    ``init_r`` triplets per layer at the start, ``target_r`` per layer on average at the end; ``alpha``
    (PEFT's ``lora_alpha``) scales the update by alpha / init_r. The budget stays at its start for
    ``tinit`` steps, falls until step ``total_step - tfinal``, and is fixed after; it is applied every
    ``deltaT`` steps. ``beta1``/``beta2`` smooth the sensitivity and its uncertainty;
    ``orth_reg_weight`` weighs the orthogonality penalty in the loss.
    """
    total_step: int
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        if not _is_int(self.init_r) or self.init_r < 1:
            raise ValueError(f"init_r must be a positive integer (each layer's rank at the start), got {self.init_r!r}")
        if not _is_int(self.target_r) or not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"target_r={self.target_r!r} must be an integer from 1 to init_r={self.init_r}: AdaLoRA "
                             "only takes rank away. Raise init_r or lower target_r")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        for name in ("total_step", "tinit", "tfinal", "deltaT"):
            value, least = getattr(self, name), 0 if name in ("tinit", "tfinal") else 1
            if not _is_int(value) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}"
                                 + ("; deltaT=1 reallocates at every step" if name == "deltaT" else ""))
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"tinit={self.tinit} + tfinal={self.tfinal} >= total_step={self.total_step} leaves no "
                             "steps to prune in (PEFT refuses this too); lower tinit or tfinal, or raise total_step")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise ValueError(f"{name} must lie strictly between 0 and 1 (PEFT asserts it; 0 would make every "
                                 f"score zero), got {value!r}; the usual value is 0.85")
        w = self.orth_reg_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"orth_reg_weight must be a finite number >= 0, got {w!r}")


# ---------------------------------------------------------------- the layer
def init_svd_triplets(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, ...]:
    """(W_a (in, r), E (r,), W_b (r, out)) as PEFT starts them: E = 0, P and Q ~ N(0, 0.02^2).

    Drawn on the CPU with the global generator in PEFT's exact order (it first fills Q, E, P and its
    ``ranknum`` placeholder with ``randn``, then overwrites them), so that the same seed gives the
    same numbers as ``peft.get_peft_model`` on the same layers in the same order.
    """
    Q, E, P = torch.randn(r, in_features), torch.randn(r, 1), torch.randn(out_features, r)
    torch.randn(1)  # PEFT's ranknum placeholder, overwritten by float(r)
    nn.init.zeros_(E)
    nn.init.normal_(Q, mean=0.0, std=0.02)
    nn.init.normal_(P, mean=0.0, std=0.02)
    return Q.T.contiguous(), E.view(r), P.T.contiguous()


class AdaLoraLayer(Qlora_4_bit):
    """A ``Qlora_4_bit`` base (4-bit, or the dense weight with ``use_qlora=False``) plus the triplets
    ``W_a`` = Q^T (in, r), ``E`` (r,), ``W_b`` = P^T (r, out), all float32, r = init_r:

        y = base(x) + ((x @ (W_a * E)) @ W_b) * alpha / (ranknum + 1e-5)

    computed in PEFT's order (``SVDLinear.forward``). ``ranknum`` stays ``init_r``: pruning zeroes E[i]
    and never changes the scale. The base has no plain LoRA pair (``require_lora`` is False), so the
    plain-LoRA tools (``adapters.save_adapter``, ``export_peft``, ``merge``) do not mistake it for one.
    """

    def __init__(self, in_features: int, out_features: int, alpha: float, r: int, require_lora: bool = False,
                 use_qlora: bool = True, **kwargs):
        where = kwargs.get("name") or "AdaLoraLayer"
        if require_lora or kwargs.get("use_dora") or kwargs.get("rslora"):
            raise ValueError(f"{where}: an AdaLoRA layer holds W_a, E, W_b instead of a LoRA pair; require_lora, "
                             "use_dora and rslora do not apply (PEFT refuses DoRA for AdaLoRA too)")
        super().__init__(in_features, out_features, alpha, r, False, use_qlora, **kwargs)
        device = self.quant_nn.weight.device
        W_a, E, W_b = init_svd_triplets(r, in_features, out_features)
        self.W_a = nn.Parameter(W_a.to(device))
        self.E = nn.Parameter(E.to(device))
        self.W_b = nn.Parameter(W_b.to(device))
        self.register_buffer("ranknum", torch.full((1,), float(r), device=device), persistent=False)
        self.scale = alpha / (r + EPS)  # for reading only: forward divides by the float32 ranknum + 1e-5

    def svd_branch(self, x: torch.Tensor) -> torch.Tensor:
        """((x @ (W_a * E)) @ W_b) * alpha / (ranknum + 1e-5), as PEFT's ``x @ (A * E).T @ B.T * scaling / ranknum``."""
        update = (x @ (self.W_a * self.E).to(x.dtype)) @ self.W_b.to(x.dtype)
        return update * self.alpha / (self.ranknum + EPS).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.quant_nn(x) + self.svd_branch(x)

    def delta_weight(self) -> torch.Tensor:
        """P Λ Q * alpha / (ranknum + 1e-5), the (out, in) update, in float32 (PEFT's ``get_delta_weight``)."""
        W_a, E, W_b = (t.detach().float() for t in (self.W_a, self.E, self.W_b))
        return (W_b.T @ (W_a * E).T) * self.alpha / (self.ranknum.float() + EPS)

    def merged_weight(self) -> torch.Tensor:
        return self.base_weight().float() + self.delta_weight()

    def kept(self) -> int:
        """How many triplets have a non-zero E (the rank the layer uses now)."""
        return int((self.E.detach() != 0).sum())

    def extra_repr(self) -> str:
        base = "4-bit base" if self.use_qlora else "dense base"
        kept = "?" if self.E.is_meta else self.kept()
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode=AdaLoRA on a {base}, "
                f"init_r={self.r}, kept={kept}, alpha={self.alpha}")


def adalora_layers(model: nn.Module) -> dict[str, AdaLoraLayer]:
    """The model's AdaLoRA layers by qualified name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}


def rank_allocator(model: nn.Module) -> "RankAllocator":
    """The ``RankAllocator`` that ``adalora_model`` attached to ``model`` (``model.adalora``)."""
    allocator = model.__dict__.get(ATTRIBUTE)
    if not isinstance(allocator, RankAllocator):
        raise ValueError("the model is not an AdaLoRA model: wrap it with adalora_model(model, targets, "
                         "total_step=...) first (or load one with load_adalora / import_adalora_peft)")
    return allocator


# ---------------------------------------------------------------- the orthogonality penalty
def orth_regularization(model: nn.Module) -> torch.Tensor:
    """Mean over all P and Q of ||Q Q^T - I||_F and ||P^T P - I||_F, as PEFT's ``AdaLoraModel.forward``.

    PEFT (and so this) takes the Frobenius norm itself, not its square as the AdaLoRA paper writes
    R(P, Q), and averages over the 2 x (number of layers) matrices, Q then P, layer by layer.
    """
    total, count = 0, 0
    for layer in adalora_layers(model).values():
        for gram in (layer.W_a.T @ layer.W_a, layer.W_b @ layer.W_b.T):  # Q Q^T and P^T P, (r, r)
            eye = torch.eye(*gram.shape, out=torch.empty_like(gram))
            total = total + torch.norm(gram - eye, p="fro")
            count += 1
    return total / count if count else torch.zeros(())


def add_orth_regularization(module: nn.Module, args, output):
    """Forward hook of an AdaLoRA model: ``output.loss += orth_reg_weight * orth_regularization``.

    As in PEFT, whenever the output carries a loss (labels given), in training and evaluation alike.
    It also counts training forward passes, to catch a training loop that never calls
    ``update_and_allocate`` (AdaLoRA would silently be a LoRA of rank init_r).
    """
    allocator = module.__dict__.get(ATTRIBUTE)
    loss = getattr(output, "loss", None)
    if allocator is None or not isinstance(loss, torch.Tensor):
        return None
    if module.training and torch.is_grad_enabled():
        allocator.training_forwards += 1
        allocator.check_called()
    output["loss"] = loss + allocator.settings.orth_reg_weight * orth_regularization(module)
    return output


# ---------------------------------------------------------------- making a model AdaLoRA
def adalora_model(model: nn.Module, targets, *, total_step: int, init_r: int = 12, target_r: int = 8,
                  alpha: float = 8, tinit: int = 0, tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85,
                  beta2: float = 0.85, orth_reg_weight: float = 0.5, use_qlora: bool = True,
                  **layer_kwargs) -> nn.Module:
    """Replace the ``nn.Linear`` layers named in ``targets`` by ``AdaLoraLayer``s; return ``model``.

    ``targets`` as for ``quantize_model`` (names, dotted tails, or "mlp" / "attention" / "all").
    ``use_qlora=True`` puts the triplets on a 4-bit NF4 base, ``False`` on the frozen dense weight;
    ``layer_kwargs`` go to the layer (``compute_dtype``, ``quant_type``, ``blocksize``, ``double_quant``).
    Every parameter but W_a, E and W_b is frozen. The model gets its ``RankAllocator`` as
    ``model.adalora`` and a forward hook that adds the orthogonality penalty to the loss. Layers are
    built in model order with PEFT's initialisation, so ``torch.manual_seed(s)`` before this call and
    before ``peft.get_peft_model`` gives the same numbers. Everything is checked first; a failed call
    leaves the model as it was.
    """
    settings = AdaLoraSettings(total_step=total_step, init_r=init_r, target_r=target_r, alpha=alpha, tinit=tinit,
                               tfinal=tfinal, deltaT=deltaT, beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight)
    return _wrap(model, targets, settings, use_qlora, layer_kwargs)


def _wrap(model: nn.Module, targets, settings: AdaLoraSettings, use_qlora: bool, layer_kwargs: dict) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if wrapped_layers(model) or ATTRIBUTE in model.__dict__:
        raise ValueError("the model already holds Qlora_4_bit or AdaLoRA layers; AdaLoRA wraps a plain model once. "
                         "Start from a freshly loaded model")
    _check_not_prequantized(model)
    found = lora_targets(model, targets)  # in model order; an unknown target names the layers that exist
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    for name, linear in found:
        check_plain_linear(linear, name)
        if owners[id(linear.weight)] > 1:
            raise ValueError(f"{name}.weight is shared with another layer (tied embeddings); leave it out of targets")
        check_weight_to_wrap(linear, name, bool(use_qlora), layer_kwargs.get("quant_type", "nf4"))
    with unchanged_on_error(model):
        built = [(name, AdaLoraLayer.from_linear(linear, settings.alpha, settings.init_r, False, use_qlora, name=name,
                                                 **layer_kwargs).train(linear.training)) for name, linear in found]
        for name, layer in built:
            parent, attr = _parent(model, name)
            setattr(parent, attr, layer)
        trained = {id(p) for _, layer in built for p in (layer.W_a, layer.E, layer.W_b)}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        guard_save_pretrained(model)
    allocator = RankAllocator(settings, [name for name, _ in built])
    model.__dict__[ATTRIBUTE] = allocator
    allocator.hook = model.register_forward_hook(add_orth_regularization)
    return model


# ---------------------------------------------------------------- the rank allocator
class RankAllocator:
    """PEFT's ``RankAllocator``: the importance scores, the budget schedule and the masking.

    ``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``: {"<layer>.W_a" | ".E" | ".W_b": tensor} of the
    sensitivity |w * grad w|, its moving average and the moving average of its deviation.
    ``rank_pattern``: {layer: [kept?] * init_r} from the last masking (None before the first);
    ``final``: True once the pattern is fixed at step total_step - tfinal.
    """

    def __init__(self, settings: AdaLoraSettings, names: list[str]):
        self.settings, self.names = settings, list(names)
        self.init_bgt = settings.init_r * len(self.names)  # triplets in the whole model at the start
        self.target_bgt = settings.target_r * len(self.names)  # ... and at the end
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.final = False
        self.calls, self.last_step, self.training_forwards = 0, None, 0
        self.hook = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step): init_bgt up to tinit, then a cubic fall
        init - (init - target) * (1 - (1 - t)^3), t = (step - tinit) / (total_step - tfinal - tinit),
        rounded down, masking every deltaT steps; target_bgt after total_step - tfinal."""
        s = self.settings
        if step <= s.tinit:
            return self.init_bgt, False
        if step > s.total_step - s.tfinal:
            return self.target_bgt, True
        left = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        return int((self.init_bgt - self.target_bgt) * (left ** 3) + self.target_bgt), step % s.deltaT == 0

    def update_ipt(self, layers: dict[str, AdaLoraLayer]) -> None:
        """Sensitivity |w * grad w| of every entry, its EMA (beta1) and the EMA (beta2) of |ipt - EMA|."""
        b1, b2 = self.settings.beta1, self.settings.beta2
        with torch.no_grad():
            for name, layer in layers.items():
                for key, p in (("W_a", layer.W_a), ("W_b", layer.W_b), ("E", layer.E)):
                    k = f"{name}.{key}"
                    if k not in self.ipt:
                        self.exp_avg_ipt[k], self.exp_avg_unc[k] = torch.zeros_like(p), torch.zeros_like(p)
                    self.ipt[k] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[k] = b1 * self.exp_avg_ipt[k] + (1 - b1) * self.ipt[k]
                    deviation = (self.ipt[k] - self.exp_avg_ipt[k]).abs()
                    self.exp_avg_unc[k] = b2 * self.exp_avg_unc[k] + (1 - b2) * deviation

    def triplet_scores(self, layers: dict[str, AdaLoraLayer]) -> dict[str, torch.Tensor]:
        """{layer: (r,)} score of each triplet: E[i]'s + (the mean over column i of W_a + over row i of W_b),
        each entry scored EMA(sensitivity) * EMA(uncertainty); the means taken in PEFT's layout."""
        def score(k):
            return self.exp_avg_ipt[k] * self.exp_avg_unc[k]

        return {n: score(f"{n}.E") + (score(f"{n}.W_a").T.contiguous().mean(dim=1)
                                      + score(f"{n}.W_b").T.contiguous().mean(dim=0)) for n in layers}

    def mask_to_budget(self, layers: dict[str, AdaLoraLayer], budget: int) -> dict[str, list[bool]]:
        """Zero E[i] of every triplet scored at or below the (init_bgt - budget)-th smallest score."""
        scores = self.triplet_scores(layers)
        k = self.init_bgt - budget
        # PEFT calls kthvalue(k=0) and fails when the budget is the whole start budget (target_r == init_r,
        # or a schedule that rounds back to init_bgt); nothing is to be pruned then.
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k)[0].item() if k > 0 else -math.inf
        pattern = {}
        with torch.no_grad():
            for name, layer in layers.items():
                drop = scores[name] <= threshold
                layer.E.masked_fill_(drop, 0.0)
                pattern[name] = (~drop).tolist()
        return pattern

    def mask_using_rank_pattern(self, layers: dict[str, AdaLoraLayer]) -> None:
        with torch.no_grad():
            for name, layer in layers.items():
                keep = torch.tensor(self.rank_pattern[name], device=layer.E.device)
                layer.E.masked_fill_(~keep, 0.0)

    def check_called(self) -> None:
        """Raise if more training forward passes than total_step ran and update_and_allocate never did."""
        if self.calls == 0 and self.training_forwards > self.settings.total_step:
            raise ValueError(f"AdaLoRA: {self.training_forwards} training forward passes (total_step="
                             f"{self.settings.total_step}) and update_and_allocate was never called, so nothing was "
                             "scored or pruned. Call update_and_allocate(model, step) after optimizer.step() and "
                             "before optimizer.zero_grad() in every step, or add AdaLoraCallback() to the Trainer")


def update_and_allocate(model: nn.Module, global_step: int) -> tuple[int, dict[str, list[bool]] | None]:
    """Score the triplets and prune to the budget of ``global_step`` (counted from 0), as PEFT's
    ``AdaLoraModel.update_and_allocate``; return (budget, the rank pattern this call set, or None).

    Call it in every step after ``loss.backward()`` (PEFT's loop: after ``optimizer.step()``) and
    before ``optimizer.zero_grad()``: it reads the gradients. Before ``total_step - tfinal`` it updates
    the scores and, every ``deltaT`` steps past ``tinit``, masks to the budget; at ``total_step - tfinal``
    it fixes the final pattern (scored on the scores so far) and drops the scores; after, it applies that
    pattern again (the optimizer step may have moved a pruned E[i] off zero).
    """
    allocator = rank_allocator(model)
    s = allocator.settings
    if not _is_int(global_step) or not 0 <= global_step <= s.total_step:
        raise ValueError(f"update_and_allocate got step {global_step!r}, outside 0..total_step={s.total_step}: the "
                         "budget schedule ends at total_step. Pass the 0-based optimizer step, and set total_step to "
                         "the number of optimizer steps of the run (the Trainer's max_steps)")
    layers = adalora_layers(model)
    if list(layers) != allocator.names:
        raise ValueError(f"the model's AdaLoRA layers ({name_list(layers)}) are not the ones the allocator was made "
                         f"for ({name_list(allocator.names)}); was the model merged or rewired?")
    end = s.total_step - s.tfinal
    if global_step < end:
        missing = [f"{n}.{k}" for n, layer in layers.items() for k in ("W_a", "E", "W_b")
                   if getattr(layer, k).grad is None]
        if missing:
            raise ValueError(f"update_and_allocate found no gradient on {name_list(missing, 3)}: it scores the "
                             "triplets by |w * grad w|. Call it after loss.backward() and optimizer.step(), and "
                             "before optimizer.zero_grad()")
    elif global_step > end and not allocator.final:
        raise ValueError(f"update_and_allocate got step {global_step}, past total_step - tfinal = {end}, but the final "
                         f"rank pattern was never fixed (the last step it saw: {allocator.last_step}); call it at "
                         "every step, from 0")
    allocator.calls, allocator.last_step = allocator.calls + 1, global_step
    if global_step < end:
        allocator.update_ipt(layers)
        budget, mask = allocator.budget_schedule(global_step)
        if not mask:
            return budget, None
        allocator.rank_pattern = allocator.mask_to_budget(layers, budget)
        return budget, allocator.rank_pattern
    if global_step == end:
        budget, _ = allocator.budget_schedule(global_step)
        allocator.rank_pattern = allocator.mask_to_budget(layers, budget)
        allocator.final = True
        allocator.reset_ipt()
        return budget, allocator.rank_pattern
    allocator.mask_using_rank_pattern(layers)
    return allocator.target_bgt, None


def rank_pattern(model: nn.Module) -> dict[str, list[bool]] | None:
    """{layer: [kept?] * init_r} as the last masking left it (None before the first)."""
    return rank_allocator(model).rank_pattern


def check_allocation(model: nn.Module) -> None:
    """Raise if the model was trained (training forward passes with a loss) but ``update_and_allocate``
    never ran: what it would save, export or merge is an unpruned rank-init_r adapter."""
    allocator = rank_allocator(model)
    if allocator.calls == 0 and allocator.training_forwards > 0:
        raise ValueError(f"the model ran {allocator.training_forwards} training forward passes but update_and_allocate "
                         "was never called: nothing was scored or pruned. Call update_and_allocate(model, step) in "
                         "each step (or add AdaLoraCallback() to the Trainer) and train again")


class AdaLoraCallback(TrainerCallback):
    """Runs ``update_and_allocate(model, state.global_step)`` inside ``Trainer.train``.

    ``on_optimizer_step`` comes after ``optimizer.step()`` and before ``model.zero_grad()`` (the
    gradients are still there, clipped to ``max_grad_norm``), and ``state.global_step`` is then the
    0-based number of this step: exactly PEFT's loop. ``total_step`` should be the run's ``max_steps``.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        s = rank_allocator(model).settings
        if state.max_steps > s.total_step:
            raise ValueError(f"the Trainer runs max_steps={state.max_steps} optimizer steps but AdaLoRA's "
                             f"total_step={s.total_step}: the schedule would end before training does. Wrap the model "
                             f"with total_step={state.max_steps}")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        update_and_allocate(model, state.global_step)


# ---------------------------------------------------------------- merging
def merge_adalora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every AdaLoRA layer by a plain ``nn.Linear`` holding W0 + P Λ Q * alpha / (init_r + 1e-5)
    (a 4-bit base contributes its dequantized weight), in ``dtype`` (default: the base's original
    dtype); drop the allocator and the loss hook. Return the model."""
    allocator = rank_allocator(model)
    check_allocation(model)
    merged = {name: merged_linear(layer, dtype) for name, layer in adalora_layers(model).items()}
    with unchanged_on_error(model):
        for name, linear in merged.items():
            parent, attr = _parent(model, name)
            setattr(parent, attr, linear)
        guard_save_pretrained(model)
    allocator.hook.remove()
    del model.__dict__[ATTRIBUTE]
    return model


# ---------------------------------------------------------------- our format
def adalora_config(model: nn.Module) -> dict:
    """The JSON ``save_adalora`` writes: the settings, the layers, their base and the rank pattern."""
    allocator = rank_allocator(model)
    layers = adalora_layers(model)
    bases = {(layer.use_qlora, tuple(sorted(base_settings(layer).items()))) for layer in layers.values()}
    if len(bases) != 1:
        raise ValueError("the AdaLoRA layers do not share one base; adalora_model wraps all of them alike")
    first = next(iter(layers.values()))
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model": base_model_id(model),
            "mode": "qlora" if first.use_qlora else "lora", "base": base_settings(first),
            "targets": list(layers), **asdict(allocator.settings),
            "rank_pattern": allocator.rank_pattern, "final": allocator.final}


def save_adalora(model: nn.Module, path) -> Path:
    """Write ``adapter.safetensors`` ("<layer>.W_a", ".E", ".W_b", all init_r triplets, float32 as
    trained) and ``adapter.json`` (``adalora_config``) into the folder ``path``; return the folder.
    The scores are not saved (like an optimizer's state); the rank pattern is."""
    check_allocation(model)
    config = adalora_config(model)
    tensors = {f"{name}.{k}": cpu_copy(getattr(layer, k)) for name, layer in adalora_layers(model).items()
               for k in ("W_a", "E", "W_b")}
    return write_folder(path, CONFIG_FILE, config, WEIGHTS_FILE, tensors)


def _settings_from(config: dict, where: str) -> AdaLoraSettings:
    missing = [f.name for f in fields(AdaLoraSettings) if f.name not in config]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing}")
    return AdaLoraSettings(**{f.name: config[f.name] for f in fields(AdaLoraSettings)})


def _check_triplets(name: str, linear_in: int, linear_out: int, r: int, W_a, E, W_b) -> None:
    want = {"W_a": (linear_in, r), "E": (r,), "W_b": (r, linear_out)}
    for key, t in (("W_a", W_a), ("E", E), ("W_b", W_b)):
        if tuple(t.shape) != want[key]:
            raise ValueError(f"{name}: {key} has shape {tuple(t.shape)} but the layer needs {want[key]} "
                             f"({linear_in} -> {linear_out}, init_r={r}); is it the adapter's base model?")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{name}: {key} must hold finite floating-point values")


def _check_pattern(pattern, names, r: int, where: str) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, dict) or set(pattern) != set(names) or not all(
            isinstance(v, list) and len(v) == r and all(isinstance(b, bool) for b in v) for v in pattern.values()):
        raise ValueError(f"{where}: rank_pattern must map each of the layers to {r} booleans (init_r), got {pattern!r}")


def _layer_sizes(model: nn.Module, names) -> dict[str, tuple[int, int]]:
    """(in, out) of each named layer of the model: a plain nn.Linear or an AdaLoRA layer."""
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), (nn.Linear, AdaLoraLayer))]
    if missing:
        raise ValueError(f"the model has no linear layer named {name_list(missing)}: is it the adapter's base model?")
    return {n: (modules[n].in_features, modules[n].out_features) for n in names}


def _install(model: nn.Module, names: list[str], settings: AdaLoraSettings, triplets: dict, pattern, final: bool,
             use_qlora: bool, layer_kwargs: dict, where: str) -> nn.Module:
    """Check the triplets against the model, wrap a plain model with ``use_qlora`` and ``layer_kwargs``
    (an AdaLoRA model must have the same layers, settings and base), copy them in."""
    sizes = _layer_sizes(model, names)
    for name in names:
        _check_triplets(name, *sizes[name], settings.init_r, *triplets[name])
    if ATTRIBUTE in model.__dict__:
        allocator = rank_allocator(model)
        layers = adalora_layers(model)
        if list(layers) != names or allocator.settings != settings:
            raise ValueError(f"the model is AdaLoRA already, with other layers or settings than {where}; load it "
                             "into a plain model")
        for name, layer in layers.items():
            if layer.use_qlora != use_qlora or (use_qlora and layer_kwargs and base_settings(layer) != layer_kwargs):
                have = f"4-bit {base_settings(layer)}" if layer.use_qlora else "dense"
                want = f"4-bit {layer_kwargs}" if use_qlora else "dense"
                raise ValueError(f"{name}: the layer's base ({have}) is not the one asked for ({want}); load into a "
                                 "plain model, or wrap it with the adapter's base")
    else:
        _wrap(model, names, settings, use_qlora, layer_kwargs)
        allocator = rank_allocator(model)
    layers = adalora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            for p, t in zip((layer.W_a, layer.E, layer.W_b), triplets[name]):
                p.copy_(t)
    allocator.rank_pattern, allocator.final = pattern, final
    return model


def load_adalora(model: nn.Module, path, use_qlora: bool | None = None) -> nn.Module:
    """Load what ``save_adalora`` wrote into ``model``; return it. A plain model is wrapped as saved (its
    targets, settings and base; ``use_qlora=False`` puts the triplets on the dense weights instead); an
    AdaLoRA model must have the same layers and settings. Everything is checked before anything is
    copied; a failed call leaves the model as it was. Bit-exact."""
    config, tensors = read_folder(path, CONFIG_FILE, WEIGHTS_FILE, fmt=FORMAT, what="AdaLoRA adapter folder",
                                  hint="save_adalora writes both.")
    settings = _settings_from(config, CONFIG_FILE)
    names = config.get("targets")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{CONFIG_FILE}: targets must be a non-empty list of layer names, got {names!r}")
    expected = {f"{n}.{k}" for n in names for k in ("W_a", "E", "W_b")}
    if set(tensors) != expected:
        raise ValueError(f"{WEIGHTS_FILE} does not hold exactly W_a, E, W_b of the targets; missing: "
                         f"{name_list(sorted(expected - set(tensors))) or 'none'}; unexpected: "
                         f"{name_list(sorted(set(tensors) - expected)) or 'none'}")
    _check_pattern(config.get("rank_pattern"), names, settings.init_r, CONFIG_FILE)
    if config.get("mode") not in ("qlora", "lora") or not isinstance(config.get("base"), dict):
        raise ValueError(f"{CONFIG_FILE}: mode must be 'qlora' or 'lora' and base a dict; the file is damaged")
    saved_qlora = config["mode"] == "qlora"
    use_qlora = saved_qlora if use_qlora is None else bool(use_qlora)
    # the saved base when the adapter goes back onto a 4-bit base; the dense weights otherwise
    layer_kwargs = dict(config["base"]) if (use_qlora and saved_qlora) else {}
    triplets = {n: tuple(tensors[f"{n}.{k}"] for k in ("W_a", "E", "W_b")) for n in names}
    return _install(model, names, settings, triplets, config.get("rank_pattern"), bool(config.get("final", False)),
                    use_qlora, layer_kwargs, "the saved adapter")


# ---------------------------------------------------------------- PEFT's AdaLoRA format
def export_adalora_peft(model: nn.Module, path, task_type: str = "CAUSAL_LM") -> Path:
    """Write the adapter as PEFT's ``save_pretrained`` does; ``PeftModel.from_pretrained(base, path)`` loads it.

    ``adapter_config.json`` has ``peft_type: "ADALORA"`` and the rank pattern under PEFT's keys
    ("<layer>.lora_E"); ``adapter_model.safetensors`` holds ``base_model.model.<layer>.lora_A`` (r', in),
    ``.lora_E`` (r', 1) and ``.lora_B`` (out, r') with only the r' triplets the pattern keeps (all of
    them before the first masking), as PEFT saves them.
    """
    check_allocation(model)
    allocator = rank_allocator(model)
    s = allocator.settings
    pattern = allocator.rank_pattern
    tensors = {}
    for name, layer in adalora_layers(model).items():
        keep = torch.tensor(pattern[name]) if pattern else torch.ones(s.init_r, dtype=torch.bool)
        keep = keep.to(layer.E.device)
        tensors[f"{PEFT_PREFIX}{name}.lora_A"] = cpu_copy(layer.W_a.T[keep])
        tensors[f"{PEFT_PREFIX}{name}.lora_E"] = cpu_copy(layer.E[keep].unsqueeze(1))
        tensors[f"{PEFT_PREFIX}{name}.lora_B"] = cpu_copy(layer.W_b.T[:, keep])
    config = {
        "peft_type": "ADALORA", "task_type": task_type, "base_model_name_or_path": base_model_id(model),
        "init_r": s.init_r, "target_r": s.target_r, "lora_alpha": s.alpha, "tinit": s.tinit, "tfinal": s.tfinal,
        "deltaT": s.deltaT, "beta1": s.beta1, "beta2": s.beta2, "orth_reg_weight": s.orth_reg_weight,
        "total_step": s.total_step, "rank_pattern": {f"{n}.lora_E": v for n, v in pattern.items()} if pattern else None,
        "target_modules": _peft_targets(model, adalora_layers(model)), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    return write_folder(path, PEFT_CONFIG_FILE, config, PEFT_WEIGHTS_FILE, tensors)


ADALORA_USED = {"peft_type", "init_r", "target_r", "lora_alpha", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                "orth_reg_weight", "total_step", "rank_pattern", "target_modules"}
# PEFT's AdaLoRA ignores r (it warns) and use_rslora (its scale is always lora_alpha / ranknum).
ADALORA_IRRELEVANT = PEFT_IRRELEVANT | {"r", "use_rslora", "peft_version"}


def import_adalora_peft(model: nn.Module, path, use_qlora: bool = False, **layer_kwargs) -> nn.Module:
    """Wrap ``model`` (the plain base model) and load a PEFT AdaLoRA adapter into it; return the model.

    Each layer gets all init_r triplets: the saved ones where the rank pattern keeps them, zeros
    elsewhere (E = 0 there, so the layer computes what PEFT's pruned layer computes); the pattern
    counts as fixed. Config fields we cannot honour are errors naming the field. ``use_qlora=True``
    (and ``layer_kwargs``) runs it on a 4-bit base.
    """
    config, tensors = read_folder(path, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, what="PEFT adapter folder",
                                  hint="import_adalora_peft reads safetensors only, never adapter_model.bin.")
    if ATTRIBUTE in model.__dict__ or wrapped_layers(model):
        raise ValueError("import_adalora_peft wraps a plain base model; this one is wrapped already")
    if config.get("peft_type") != "ADALORA":
        raise ValueError(f"{PEFT_CONFIG_FILE}: peft_type is {config.get('peft_type')!r}, not 'ADALORA'; a LoRA "
                         "adapter loads with adapters.import_peft")
    for key in ("init_r", "lora_alpha", "total_step", "target_modules"):
        if key not in config:
            raise ValueError(f"{PEFT_CONFIG_FILE} lacks the field {key!r}")
    for key, value in config.items():
        if key not in ADALORA_USED and key not in ADALORA_IRRELEVANT and not _neutral(value):
            reason = PEFT_REASONS.get(key, "import_adalora_peft does not know how to honour it")
            raise ValueError(f"{PEFT_CONFIG_FILE}: field {key}={value!r} cannot be honoured: {reason}")
    defaults = AdaLoraSettings.__dataclass_fields__
    settings = AdaLoraSettings(**{f: config.get(k, defaults[f].default) for f, k in (
        ("init_r", "init_r"), ("target_r", "target_r"), ("alpha", "lora_alpha"), ("tinit", "tinit"),
        ("tfinal", "tfinal"), ("deltaT", "deltaT"), ("beta1", "beta1"), ("beta2", "beta2"),
        ("orth_reg_weight", "orth_reg_weight"))}, total_step=config["total_step"])
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".")
        if not key.startswith(PEFT_PREFIX) or kind not in ("lora_A", "lora_E", "lora_B"):
            raise ValueError(f"{PEFT_WEIGHTS_FILE} holds {key!r}, not an AdaLoRA tensor "
                             f"('{PEFT_PREFIX}<layer>.lora_A', '.lora_E' or '.lora_B')")
        layers.setdefault(name, {})[kind] = value
    incomplete = [n for n, t in layers.items() if len(t) != 3]
    if incomplete or not layers:
        raise ValueError(f"{PEFT_WEIGHTS_FILE} must hold lora_A, lora_E and lora_B of each layer; incomplete: "
                         f"{name_list(incomplete) or 'no layers at all'}")
    names = [q for q, _ in model.named_modules() if q in layers]  # model order
    if set(names) != set(layers) or _peft_targeted(model, config["target_modules"]) != set(layers):
        raise ValueError(f"target_modules={config['target_modules']!r} and {PEFT_WEIGHTS_FILE} "
                         f"({name_list(sorted(layers))}) disagree on this model; is it the adapter's base model?")
    saved = config.get("rank_pattern")
    pattern = None if saved is None else {n: saved.get(f"{n}.lora_E") for n in names}
    _check_pattern(pattern, names, settings.init_r, f"{PEFT_CONFIG_FILE} (keys '<layer>.lora_E')")
    sizes = _layer_sizes(model, names)
    triplets = {}
    for name in names:
        t, (n_in, n_out), r = layers[name], sizes[name], settings.init_r
        keep = torch.tensor(pattern[name]) if pattern else torch.ones(r, dtype=torch.bool)
        kept = int(keep.sum())
        if (tuple(t["lora_A"].shape), tuple(t["lora_E"].shape), tuple(t["lora_B"].shape)) != (
                (kept, n_in), (kept, 1), (n_out, kept)):
            raise ValueError(f"{name}: lora_A {tuple(t['lora_A'].shape)}, lora_E {tuple(t['lora_E'].shape)}, lora_B "
                             f"{tuple(t['lora_B'].shape)} do not fit {kept} kept triplets of a {n_in} -> {n_out} layer")
        W_a, E, W_b = torch.zeros(n_in, r), torch.zeros(r), torch.zeros(r, n_out)
        W_a[:, keep], E[keep], W_b[keep] = t["lora_A"].T.float(), t["lora_E"].view(-1).float(), t["lora_B"].T.float()
        triplets[name] = (W_a, E, W_b)
    return _install(model, names, settings, triplets, pattern, pattern is not None, use_qlora, layer_kwargs,
                    PEFT_CONFIG_FILE)

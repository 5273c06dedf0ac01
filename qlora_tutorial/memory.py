"""Where the memory of a training step goes, computed from the model itself.

At the peak of a training step the device holds

    weights + gradients + optimizer states + saved activations + transient workspace

* weights: every parameter and buffer as stored (a 4-bit weight is its packed bytes plus its
  quantization constants), counted by ``weight_bytes``.
* gradients: one per trainable parameter, in the parameter's dtype (``gradient_bytes``).
* optimizer states: AdamW keeps two (``exp_avg``, ``exp_avg_sq``) per trainable parameter, in the
  parameter's dtype (``optimizer_state_bytes``).
* saved activations: the tensors autograd keeps from the forward pass for the backward pass. We
  count them, not guess them: ``saved_activation_bytes`` runs a forward pass with
  ``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages saved.
  ``activation_estimate`` does that on two small models with the real layer widths (one and two
  decoder layers) and scales the result linearly to the real depth and number of tokens.
* transient workspace: what exists only for a moment (a dequantized weight, the gradient of the
  logits, matmul workspaces); it is what the measured peak has beyond the four above.

Every byte count of a 4-bit weight comes from one rule: the packed bytes (half a byte per weight)
plus the tensors of its quantization state (absmax; the 16-value code; with double quantization the
8-bit absmax codes' own absmax2, offset and 256-value code). ``quantized_nbytes`` computes it from a
count of weights, ``bnb_nbytes`` reads it off the tensors; a test checks that they agree.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import bitsandbytes as bnb
import torch
from torch import nn

from .nf4 import BLOCKSIZE2, as_state

GIB = 2 ** 30
ADAMW_STATES = 2  # exp_avg and exp_avg_sq


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------- 4-bit weights
def bits_per_param(blocksize: int = 64, double_quant: bool = False, blocksize2: int = BLOCKSIZE2) -> float:
    """Storage per weight: 4 bits plus its share of the block constants.

    Without double quantization one float32 per block: 4 + 32/blocksize (4.5 for 64). With it one
    byte per block plus one float32 per blocksize2 blocks: 4 + 8/blocksize + 32/(blocksize*blocksize2).
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


def quantized_nbytes(numel: int, blocksize: int = 64, double_quant: bool = False,
                     blocksize2: int = BLOCKSIZE2) -> dict:
    """Exact bytes bitsandbytes keeps for one quantized tensor of ``numel`` values.

    packed: ceil(n/2); absmax: 4 per block (or 1 per block with double quantization, plus 4 per
    ``blocksize2`` blocks and a 4-byte offset); code tables: the 16-value 4-bit code (64 bytes) and,
    with double quantization, the 256-value dynamic code (1 KiB), stored with every tensor.
    """
    blocks = -(-numel // blocksize)
    out = {"packed": (numel + 1) // 2, "code": 16 * 4}
    if double_quant:
        out.update(absmax=blocks, absmax2=4 * -(-blocks // blocksize2), offset=4, code2=256 * 4)
    else:
        out.update(absmax=4 * blocks)
    out["total"] = sum(out.values())
    return out


def model_weight_bytes(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                       skip: tuple[str, ...] = ("lm_head",), other_bytes_per_param: int = 2) -> dict:
    """The weight memory of a model whose Linear layers are NF4, the rest kept in 16 bits.

    Linear layers whose name ends in one of ``skip`` stay unquantized (transformers keeps
    ``lm_head`` in 16 bits by default); embeddings, norms, biases take ``other_bytes_per_param``.
    Works on a model built on the ``meta`` device: only shapes are read. Shared (tied) parameters
    count once. Returns parameter counts and bytes: ``quantized_params``, ``other_params``,
    ``packed_bytes``, ``constant_bytes`` (absmax and everything double quantization adds),
    ``other_bytes``, ``total_bytes`` and ``bits_per_quantized_param``.
    """
    quantized = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(name.endswith(s) for s in skip):
            quantized.add(id(module.weight))
    seen = set()
    q_params = other_params = packed = constants = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in quantized:
            sizes = quantized_nbytes(param.numel(), blocksize, double_quant)
            q_params += param.numel()
            packed += sizes["packed"]
            constants += sizes["total"] - sizes["packed"]
        else:
            other_params += param.numel()
    other = other_params * other_bytes_per_param
    return {
        "quantized_params": q_params, "other_params": other_params,
        "packed_bytes": packed, "constant_bytes": constants, "other_bytes": other,
        "total_bytes": packed + constants + other,
        "bits_per_quantized_param": 8 * (packed + constants) / max(q_params, 1),
    }


def bnb_nbytes(packed: torch.Tensor, state) -> dict:
    """Bytes of every tensor of a 4-bit quantization: ``packed`` and its state (our ``nf4.State4bit``
    or bitsandbytes' ``QuantState``): absmax and code, and with double quantization absmax2, offset
    and code2."""
    out = {"packed": tensor_bytes(packed)}
    out.update({name: tensor_bytes(t) for name, t in as_state(state).tensors().items()})
    out["total"] = sum(out.values())
    return out


def state_bytes(state) -> int:
    """Bytes of a 4-bit quantization state alone (what every rank keeps whole when FSDP shards the bytes)."""
    return sum(tensor_bytes(t) for t in as_state(state).tensors().values())


def dequantization_bytes(packed: torch.Tensor, state, dtype: torch.dtype) -> int:
    """Bytes one dequantization moves through memory: it reads the packed bytes and the block scales
    (with double quantization the 8-bit codes and their float32 absmax2) and writes the weight in
    ``dtype``. The code tables are a few hundred bytes that stay in the cache: not counted."""
    sizes = bnb_nbytes(packed, state)
    return (sizes["packed"] + sizes["absmax"] + sizes.get("absmax2", 0)
            + as_state(state).shape.numel() * torch.empty((), dtype=dtype).element_size())


# ---------------------------------------------------------------- a model's memory
def weight_bytes(model: nn.Module) -> int:
    """Bytes the model holds at rest: parameters and buffers as stored, plus 4-bit quantization constants.

    Shared (tied) tensors count once. A packed 4-bit weight stores half a byte per logical weight,
    an 8-bit (LLM.int8) weight a byte plus a float32 scale per row.
    A 4-bit weight not quantized yet (a model built on the ``meta`` device to plan memory) counts
    what bitsandbytes will store: ``quantized_nbytes`` of its logical size.
    """
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, bnb.nn.Params4bit) and t.quant_state is not None:
            total += bnb_nbytes(t, t.quant_state)["total"]
        elif isinstance(t, bnb.nn.Params4bit):  # not quantized yet: what bitsandbytes will store
            total += quantized_nbytes(t.numel(), t.blocksize, bool(t.compress_statistics))["total"]
        elif isinstance(t, bnb.nn.Int8Params) and t.dtype == torch.int8:
            total += tensor_bytes(t) + 4 * t.shape[0]  # LLM.int8: a byte per weight, a float32 scale per row
        else:
            total += tensor_bytes(t)
    return total


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def gradient_bytes(model: nn.Module) -> int:
    """One gradient per trainable parameter, in the parameter's dtype."""
    return sum(tensor_bytes(p) for p in trainable_parameters(model))


def optimizer_state_bytes(model: nn.Module, states_per_param: int = ADAMW_STATES) -> int:
    """AdamW's two moment estimates per trainable parameter, in the parameter's dtype.

    (Its per-tensor ``step`` counters are scalars kept on the CPU by default: not counted.)
    """
    return states_per_param * gradient_bytes(model)


@contextmanager
def count_saved_tensors(exclude: set[int] = frozenset()):
    """Within the block, record every tensor autograd saves; yields a dict {storage pointer: bytes}.

    Storages in ``exclude`` (e.g. the parameters'), which exist anyway, are not recorded. Two saved
    tensors that share a storage (views) count once: memory holds the storage once.
    """
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude and ptr != 0:
            saved[ptr] = storage.nbytes()
        # Not ``t`` itself: a tensor a node saves of its own output would then hold that node,
        # which holds the tensor, a cycle no garbage collector frees (the graph would leak).
        # ``detach()`` shares the storage and the version counter but not the graph.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors one training forward pass (loss included) saves for backward.

    The forward runs with ``labels=input_ids`` as training does; nothing is run backward. Parameter
    storages are left out (they are weights, counted by ``weight_bytes``).
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter requires grad: a training forward would save nothing; "
                         "make the trainable parameters require grad first")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    was_training = model.training
    model.train()
    try:
        with count_saved_tensors(exclude=params) as saved:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        del loss
    finally:
        model.train(was_training)
    return sum(saved.values())


def _small_copy(config, num_hidden_layers: int):
    small = copy.deepcopy(config)
    small.num_hidden_layers = num_hidden_layers
    small.use_cache = False
    return small


def activation_estimate(config, prepare, batch: int, seq: int, dtype: torch.dtype = torch.bfloat16,
                        grad_ckpt: bool = False, probe_tokens: int = 32, seed: int = 0,
                        device: str | torch.device = "cpu") -> dict:
    """Saved activations of a full-size training step, counted on small models and scaled up.

    ``prepare(model) -> model`` turns a freshly built model into the training setup (e.g. wraps it
    with LoRA). We build ``config``'s architecture with 1 and with 2 decoder layers and count the
    saved bytes of a forward over T and 2T tokens (T = ``probe_tokens``). Four counts separate four
    numbers: per decoder layer, bytes per token and fixed bytes (e.g. the low-rank matrices cast to
    bf16, saved once per layer whatever the batch); outside the layers (embedding output, final
    norm, log-softmax of the logits), the same two. Attention that never stores the seq x seq score
    matrix (PyTorch's SDPA flash/efficient kernels) keeps everything linear in tokens, so

        activations = rest_fixed + rest_per_token * tokens + layers * (layer_fixed + layer_per_token * tokens)

    With gradient checkpointing only each layer's input (tokens x hidden) is kept, plus one layer's
    activations while it is recomputed, plus the rest.
    """
    from .models import build_from_config

    T = probe_tokens
    counts = {}
    for n_layers in (1, 2):
        model = prepare(build_from_config(_small_copy(config, n_layers), device=device, dtype=dtype, seed=seed))
        for tokens in (T, 2 * T):
            ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
            counts[(n_layers, tokens)] = saved_activation_bytes(model, ids.to(device))
        del model
    layer = {t: counts[(2, t)] - counts[(1, t)] for t in (T, 2 * T)}
    rest = {t: counts[(1, t)] - layer[t] for t in (T, 2 * T)}
    layer_per_token = (layer[2 * T] - layer[T]) / T
    layer_fixed = layer[T] - layer_per_token * T
    rest_per_token = (rest[2 * T] - rest[T]) / T
    rest_fixed = rest[T] - rest_per_token * T
    tokens = batch * seq
    layers = config.num_hidden_layers
    one_layer = layer_fixed + layer_per_token * tokens
    outside = rest_fixed + rest_per_token * tokens
    if grad_ckpt:
        element = torch.empty((), dtype=dtype).element_size()
        total = layers * config.hidden_size * element * tokens + one_layer + outside
    else:
        total = outside + layers * one_layer
    return {"layer_per_token": layer_per_token, "layer_fixed": layer_fixed, "rest_per_token": rest_per_token,
            "rest_fixed": rest_fixed, "tokens": tokens, "layers": layers, "grad_ckpt": grad_ckpt,
            "activation_bytes": int(round(total))}


def breakdown(model: nn.Module, activation_bytes: int = 0, states_per_param: int = ADAMW_STATES) -> dict:
    """weights, gradients, optimizer states (and activations, if given) of ``model``, in bytes."""
    out = {"weights": weight_bytes(model), "gradients": gradient_bytes(model),
           "optimizer_states": optimizer_state_bytes(model, states_per_param),
           "activations": int(activation_bytes)}
    out["total"] = sum(out.values())
    return out


def prepare_for(mode: str, r: int = 16, alpha: float = 32, dtype: torch.dtype = torch.bfloat16):
    """A function that turns a fresh model into the training setup of ``mode`` with our layer:
    'full' (everything trains), 'lora' or 'qlora' (r, alpha on every linear layer of the decoder)."""
    if mode not in ("full", "lora", "qlora"):
        raise ValueError(f"mode must be 'full', 'lora' or 'qlora', got {mode!r}")

    def prepare(model):
        if mode == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        from .quantize import quantize_model

        if mode == "lora":  # the base stays as it is, in its own dtype
            return quantize_model(model, "all", alpha, r, use_qlora=False)
        return quantize_model(model, "all", alpha, r, compute_dtype=dtype)

    return prepare

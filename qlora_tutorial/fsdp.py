"""FSDP-QLoRA: train the LoRA matrices of a 4-bit model sharded over several GPUs with PyTorch's FSDP2.

    torchrun --nproc_per_node=2 -m qlora_tutorial.fsdp --model tinyllama-random --steps 20 --out adapter_dir

Each process (rank) builds the same randomly initialised model (no download), wraps its linear layers
with ``quantize_model`` in QLoRA mode, and then FSDP2's ``fully_shard`` splits every parameter into
``world_size`` pieces along its first dimension, decoder layer by decoder layer, then the rest (the
root). Each rank keeps one piece of every weight. Before a decoder layer runs, FSDP all-gathers its
pieces into whole tensors, and after the layer has run (and again around its backward) it frees them.
The LoRA gradients are reduce-scattered: each rank receives the averaged gradient of its own piece
and the optimizer updates only that piece.

What has to be true for the 4-bit weights to survive this:

* **A storage dtype FSDP can handle.** bitsandbytes packs two 4-bit codes into a byte and keeps the
  packed weight as a (bytes, 1) uint8 tensor, with its block scales in a separate ``quant_state``
  that FSDP never sees. ``set_quant_storage`` reinterprets those bytes as the dtype of the model's
  other weights (bfloat16 on a GPU, float32 on a CPU), as bitsandbytes' ``quant_storage`` option
  does: the same bytes, viewed as half as many 16-bit (or a quarter as many 32-bit) elements.
  FSDP1, on which Answer.AI's FSDP-QLoRA was built, flattens a whole layer into one tensor and
  needs one dtype for all of it: there this is a must. FSDP2 shards each tensor on its own and
  gathers a mixture of dtypes as raw bytes, so uint8 works too (``--quant-storage uint8``; the CPU
  test run gave the same losses to the last bit). What FSDP2 does not forgive is packed bytes held
  in a floating-point dtype *other* than the one it gathers in: a mixed-precision policy
  (``param_dtype``) converts floating-point tensors as numbers, and would scramble the codes
  (integer tensors it leaves alone). The default here, the model's own dtype, is the convention
  of Answer.AI's FSDP-QLoRA and torchtune, and every cast is then a no-op.
* **The block scales are replicated.** ``quant_state`` (absmax, the NF4 code) is an attribute, not
  a parameter: every rank keeps the whole of it, about 1/16 byte per weight without double
  quantization.
* **The gathered bytes get their 4-bit identity back.** FSDP hands the layer a plain tensor with the
  gathered bytes; ``restore_4bit_weight`` (a forward pre-hook) rewraps it as a ``Params4bit`` that
  carries its ``quant_state`` again before the layer runs, as bitsandbytes' ``Linear4bit`` does
  inside its own forward.

``python -m qlora_tutorial.fsdp`` without torchrun runs one process (world_size=1). ``--json``
records memory per GPU and step time with provenance (device, world_size, versions, date, command).
The data are random token ids from a fixed seed (the model is random too): this entry point is for
checking and measuring the machinery, not for teaching the model anything.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch import nn

from . import memory
from .layer import Qlora_4_bit
from .quantize import lora_parameters, quantize_model

# every linear layer of a Llama decoder layer (lm_head stays as it is)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = ("tiny-random", "tinyllama-random", "llama7b-random")


# ---------------------------------------------------------------- models
def model_config(name: str):
    """The architecture behind a --model name; every one is randomly initialised, nothing is downloaded."""
    from .models import training_config

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return training_config(name.removesuffix("-random"))


def build_model(name: str, device: torch.device, dtype: torch.dtype, *, r: int = 16, alpha: float = 32,
                targets=TARGETS, seed: int = 0, double_quant: bool = True,
                quant_storage: torch.dtype | None = None) -> nn.Module:
    """The model of ``name`` in ``dtype`` on ``device``, wrapped in QLoRA mode, its 4-bit bytes stored as
    ``quant_storage`` (default: ``dtype``; ``torch.uint8`` keeps bitsandbytes' own layout).

    Every rank calls this with the same seed and gets the same weights, LoRA matrices included.
    """
    from .models import build_from_config

    model = build_from_config(model_config(name), device=device, dtype=dtype, seed=seed)
    torch.manual_seed(seed + 1)  # the LoRA initialisation, the same on every rank
    quantize_model(model, targets, alpha, r, use_qlora=True, compute_dtype=dtype, double_quant=double_quant)
    quant_storage = quant_storage or dtype
    if quant_storage != torch.uint8:
        set_quant_storage(model, quant_storage)
    return model


# ---------------------------------------------------------------- 4-bit weights FSDP can shard
def _4bit_layers(module: nn.Module) -> list[tuple[str, bnb.nn.Linear4bit]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def set_quant_storage(module: nn.Module, dtype: torch.dtype) -> int:
    """Store the packed 4-bit bytes of every ``Linear4bit`` in ``module`` as ``dtype``; return how many.

    A view, not a conversion: the bytes stay the same (and so does what they dequantize to), only the
    element type changes, exactly as bitsandbytes' ``quant_storage=dtype`` lays them out. Everything
    is checked before the first layer changes.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    layers = _4bit_layers(module)
    if not layers:
        raise ValueError("the module holds no bitsandbytes Linear4bit layer: wrap it with quantize_model(model, "
                         "targets, alpha, r) (use_qlora=True) first")
    for name, layer in layers:
        w = layer.weight
        if not getattr(w, "bnb_quantized", False):
            raise ValueError(f"{name}: its weight is not quantized yet (on the meta device?); move the model "
                             "to its device first, which quantizes it")
        nbytes = w.numel() * w.element_size()
        if nbytes % dtype.itemsize:
            raise ValueError(f"{name}: its {nbytes} packed bytes do not fill whole {dtype} elements "
                             f"({dtype.itemsize} bytes each): its weight count must be a multiple of "
                             f"{2 * dtype.itemsize}. Use a smaller storage dtype, or leave the model in uint8")
    for _, layer in layers:
        w = layer.weight
        w.data = w.data.reshape(-1).view(torch.uint8).view(dtype).unsqueeze(1)
        w.quant_storage = layer.quant_storage = dtype
    return len(layers)


def restore_4bit_weight(layer: Qlora_4_bit, args) -> None:
    """Forward pre-hook: give the gathered bytes FSDP hands the layer their ``Params4bit`` identity back.

    FSDP2 all-gathers a weight into a plain tensor; the layer's block scales live in
    ``quant_nn.quant_state`` (bitsandbytes keeps a copy on the module for this reason).
    """
    linear = layer.quant_nn
    w = linear.weight
    if isinstance(w, bnb.nn.Params4bit):
        return
    state = linear.quant_state
    linear.weight = bnb.nn.Params4bit(
        w, requires_grad=False, quant_state=state, blocksize=state.blocksize, compress_statistics=state.nested,
        quant_type=state.quant_type, quant_storage=w.dtype, module=linear, bnb_quantized=True)


def check_shardable(model: nn.Module, dtype: torch.dtype) -> None:
    """Every 4-bit weight stored as ``dtype`` (or uint8).

    Packed bytes stored in another floating-point dtype are a trap: a cast to the model's dtype (by
    ``model.to``, or by an FSDP mixed-precision policy, which leaves only integer tensors alone)
    would convert the codes as if they were numbers.
    """
    for name, layer in _4bit_layers(model):
        if layer.weight.dtype not in (dtype, torch.uint8):
            raise ValueError(f"{name}: its 4-bit bytes are stored as {layer.weight.dtype}, the model's other "
                             f"weights as {dtype}; call set_quant_storage(model, {dtype}) before sharding")


def shard(model: nn.Module, mesh) -> nn.Module:
    """FSDP2: one unit per decoder layer (gathered only while it runs), then the root for the rest."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, Qlora_4_bit) and isinstance(m.quant_nn, bnb.nn.Linear4bit):
            m.register_forward_pre_hook(restore_4bit_weight)
    return model


def gather_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole LoRA matrices of a (possibly sharded) model, as CPU tensors named as ``save_adapter`` names them.

    A collective when the model is sharded: every rank must call it.
    """
    from torch.distributed.tensor import DTensor

    from .adapters import lora_layers

    tensors = {}
    for name, layer in lora_layers(model).items():
        for attr in ("W_a", "W_b"):
            t = getattr(layer, attr).detach()
            if isinstance(t, DTensor):
                t = t.full_tensor()
            tensors[f"{name}.{attr}"] = t.to("cpu", copy=True).contiguous()
    return tensors


# ---------------------------------------------------------------- training
def token_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` global batches of random token ids (batch x seq), the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(steps)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: nn.Module, batches, device: torch.device, *, lr: float = 2e-4, max_grad_norm: float | None = 1.0,
          rank: int = 0, world_size: int = 1) -> dict:
    """AdamW on the LoRA matrices; rank ``rank`` takes its slice of every global batch.

    Returns {"losses": the global mean loss per step, "step_s": seconds per step}. Every rank holds
    the same number of label tokens, so the mean of the ranks' mean losses is the mean over the
    global batch, and FSDP's gradient average is the gradient of that global mean: the same step
    a single process takes on the whole batch, up to the order of floating-point sums.
    """
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA matrices to train: wrap it with quantize_model(..., require_lora=True)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # the Trainer's defaults
    model.train()
    losses, times = [], []
    for ids in batches:
        if ids.shape[0] % world_size:
            raise ValueError(f"the global batch of {ids.shape[0]} does not split evenly over {world_size} ranks")
        local = ids.shape[0] // world_size
        ids = ids[rank * local:(rank + 1) * local].to(device)
        _sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # sharded grads: the norm is global
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().float()
        if world_size > 1:
            dist.all_reduce(loss)  # gloo has no AVG: sum, then divide
            loss /= world_size
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    model.eval()
    return {"losses": losses, "step_s": times}


# ---------------------------------------------------------------- the entry point
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m qlora_tutorial.fsdp",
                                description="Train LoRA matrices on a 4-bit model sharded with FSDP2.")
    p.add_argument("--model", default="tiny-random", choices=MODELS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the step time (default 3)")
    p.add_argument("--batch", type=int, default=8, help="global batch: sequences per step over all ranks")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="double_quant=False (default: double quantization, as the QLoRA paper)")
    p.add_argument("--grad-ckpt", action="store_true", help="non-reentrant activation checkpointing")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quant-storage", default="model", choices=("model", "uint8"),
                   help="the element type of the packed 4-bit bytes: the model's dtype (default) or uint8")
    p.add_argument("--no-shard", action="store_true",
                   help="one process without FSDP: the plain single-device baseline (world_size must be 1)")
    p.add_argument("--out", help="folder for the adapter (save_adapter's format), written by rank 0")
    p.add_argument("--json", help="results file: the run is added (replacing one with the same settings)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        p.error("need --steps >= 1, --batch >= 1 and --seq >= 2")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup must be at least 0 and less than --steps ({args.steps})")
    return args


# how this process was started, for the "command" of the results
_LAUNCHER = "torchrun --nproc_per_node={n}"


def _init_distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); a lone ``python -m`` run becomes a world of one."""
    global _LAUNCHER
    if "RANK" not in os.environ:
        _LAUNCHER = "python"
        import socket

        with socket.socket() as s:  # a free port for the one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def _memory(device: torch.device, model: nn.Module) -> dict:
    """This rank's share of the weights (as stored) and its replicated block scales, in bytes."""
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).untyped_storage().nbytes() for p in model.parameters())
    scales = sum(memory.state_bytes(layer.quant_state) for _, layer in _4bit_layers(model))
    out = {"param_bytes": local, "quant_state_bytes": scales}
    if device.type == "cuda":
        out["allocated_bytes"] = torch.cuda.memory_allocated(device)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, local_rank = _init_distributed(device_type)
    try:
        return _run(args, argv, device_type, rank, world_size, local_rank)
    finally:
        dist.destroy_process_group()


def _run(args, argv, device_type, rank, world_size, local_rank) -> int:
    from torch.distributed.device_mesh import init_device_mesh

    from .device import pick_device
    from .train import set_checkpointing

    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    dtype = pick_device(device_type).dtype  # the package's choice: bf16 on a GPU that has it, float32 on a CPU
    if args.batch % world_size:
        raise SystemExit(f"--batch {args.batch} does not split evenly over {world_size} ranks")

    model = build_model(args.model, device, dtype, r=args.lora_r, alpha=args.lora_alpha, seed=args.seed,
                        double_quant=args.double_quant,
                        quant_storage=torch.uint8 if args.quant_storage == "uint8" else dtype)
    check_shardable(model, dtype)
    if args.grad_ckpt:
        set_checkpointing(model, True)
    if args.no_shard:
        if world_size != 1:
            raise SystemExit("--no-shard is the one-device baseline: run it with --nproc_per_node=1")
    else:
        shard(model, init_device_mesh(device_type, (world_size,)))
    if device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    resting = _memory(device, model)

    batches = token_batches(args.steps, args.batch, args.seq, model.config.vocab_size, seed=args.seed)
    result = train(model, batches, device, lr=args.lr, max_grad_norm=args.max_grad_norm or None,
                   rank=rank, world_size=world_size)
    peak = torch.cuda.max_memory_allocated(device) if device_type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) if device_type == "cuda" else None

    tensors = gather_adapter(model)  # a collective: every rank takes part
    per_rank = [None] * world_size
    dist.all_gather_object(per_rank, {"rank": rank, "peak_allocated_bytes": peak, "peak_reserved_bytes": reserved,
                                      **resting, "step_s": result["step_s"]})
    if rank == 0:
        if args.out:
            from .adapters import save_adapter

            save_adapter(model, args.out, tensors=tensors)
        # a step takes as long as its slowest rank; the median over the steps after the warm-up
        step_s = statistics.median(max(r["step_s"][i] for r in per_rank) for i in range(args.warmup, args.steps))
        run = _record(args, argv, model, device, world_size, result["losses"], step_s, per_rank)
        print(json.dumps({k: run[k] for k in ("model", "world_size", "step_s", "tokens_per_s", "losses")}))
        for r in per_rank:
            peak = "n/a" if r["peak_allocated_bytes"] is None else f"{r['peak_allocated_bytes'] / 2 ** 30:.2f} GiB"
            print(f"rank {r['rank']}: peak allocated {peak}, weights held {r['param_bytes'] / 2 ** 30:.3f} GiB, "
                  f"block scales {r['quant_state_bytes'] / 2 ** 30:.3f} GiB")
        if args.json:
            _write_json(Path(args.json), run)
    return 0


def _record(args, argv, model, device, world_size, losses, step_s, per_rank) -> dict:
    from .device import device_name, recorded_versions

    argv = sys.argv[1:] if argv is None else list(argv)
    return {
        "model": args.model, "world_size": world_size, "sharded": not args.no_shard,
        "batch": args.batch, "seq": args.seq, "r": args.lora_r, "alpha": args.lora_alpha,
        "grad_ckpt": args.grad_ckpt, "double_quant": args.double_quant,
        "quant_storage": str(next(layer.weight.dtype for _, layer in _4bit_layers(model))).replace("torch.", ""),
        "steps": args.steps, "warmup": args.warmup, "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s, "losses": losses,
        "ranks": [{k: v for k, v in r.items() if k != "step_s"} for r in per_rank],
        "device": device_name(device), **recorded_versions(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": f"{_LAUNCHER.format(n=world_size)} -m qlora_tutorial.fsdp {shlex.join(argv)}",
    }


def _write_json(path: Path, run: dict) -> None:
    """Add ``run`` to the results file, replacing a run with the same settings."""
    key = ("model", "world_size", "sharded", "batch", "seq", "r", "grad_ckpt", "double_quant", "quant_storage",
           "device")
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = [r for r in runs if tuple(r.get(k) for k in key) != tuple(run[k] for k in key)] + [run]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

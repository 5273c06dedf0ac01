"""The training-step suite: every setup (full fine-tuning, LoRA and QLoRA, ours and PEFT's) trained
on the same random weights at every point of a batch x sequence sweep, with and without gradient
checkpointing; one CSV row per measurement, and the memory breakdown beside it."""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import memory
from ..lora import TARGET_PRESETS
from ..train import set_checkpointing  # non-reentrant: frozen embeddings still pass gradients to LoRA
from .profiling import profile_steps
from .results import GIB, provenance
from .step import Point, _allocated, _free, _sync, train_step

# (mode, implementation) in the order they run. "torch": pure bf16 weights and bf16 AdamW;
# "torch-amp": what practitioners run, float32 master weights, bf16 autocast, float32 AdamW.
# "peft": PEFT as it comes, which keeps the LoRA matrices in float32 and computes their branch in float32
# on a bf16 model (``autocast_adapter_dtype=True``); "peft-nocast": PEFT with ``autocast_adapter_dtype=False``,
# its LoRA matrices in the model's dtype. Ours stores them in float32 and computes in the model's dtype.
SETUPS = [("full", "torch"), ("full", "torch-amp"), ("lora", "ours"), ("lora", "peft"), ("qlora", "ours"),
          ("qlora", "peft"), ("lora", "peft-nocast"), ("qlora", "peft-nocast")]

# every linear layer of a Llama decoder layer (lm_head stays as it is, as PEFT's default does)
TARGETS = list(TARGET_PRESETS["all"])


# ---------------------------------------------------------------- configuration
def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4x512,1x2048' -> [(4, 512), (1, 2048)]."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item!r} is not BATCHxSEQ with positive integers, e.g. 4x512")
        shapes.append((int(parts[0]), int(parts[1])))
    if not shapes:
        raise ValueError("no shapes given; use e.g. --shapes 4x512,1x2048")
    return shapes


def parse_setups(text: str) -> list[tuple[str, str]]:
    """'lora/ours,qlora/peft' (or 'all') -> [(mode, implementation), ...] in SETUPS order."""
    if text == "all":
        return list(SETUPS)
    wanted = []
    for item in text.split(","):
        pair = tuple(item.strip().split("/"))
        if pair not in SETUPS:
            raise ValueError(f"unknown setup {item!r}; choose from {', '.join(m + '/' + i for m, i in SETUPS)}")
        wanted.append(pair)
    return [s for s in SETUPS if s in wanted]


def bench_config(name: str):
    """'tinyllama': TinyLlama-1.1B's architecture; 'tiny': a small Llama (the test/quick size)."""
    from ..models import training_config

    if name not in ("tinyllama", "tiny"):
        raise ValueError(f"unknown config {name!r}: use 'tinyllama' or 'tiny'")
    return training_config(name)


# ---------------------------------------------------------------- models
def save_random_model(config, folder: Path, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Path:
    """Initialise ``config``'s architecture randomly (on ``device``: fast) and save it, so every setup
    loads the very same weights (PEFT's 4-bit base can only come from ``from_pretrained``)."""
    from ..models import build_from_config

    model = build_from_config(config, device=device, dtype=dtype, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    _free(device)
    return folder


def build(mode: str, implementation: str, folder: Path, device: torch.device, dtype: torch.dtype,
          r: int = 16, alpha: float = 32):
    """The model of one setup, on ``device``, ready to train (only what should train requires grad)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if (mode, implementation) not in SETUPS:
        raise ValueError(f"unknown setup {mode}/{implementation}; choose from {SETUPS}")
    # mixed precision keeps float32 weights; autocast computes in `dtype` (see train_step)
    kwargs = {"dtype": torch.float32 if implementation == "torch-amp" else dtype, "device_map": {"": str(device)},
              "attn_implementation": "sdpa"}
    if mode == "qlora" and implementation.startswith("peft"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)  # QLoRA as the paper defines it, and our layer's default
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    if implementation == "ours":
        from ..quantize import quantize_model

        if mode == "lora":
            quantize_model(model, TARGETS, alpha, r, use_qlora=False)
        else:
            quantize_model(model, TARGETS, alpha, r, compute_dtype=dtype)
    elif implementation.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        # No prepare_model_for_kbit_training: it would upcast the embeddings and norms to float32,
        # and we compare the layers, not that choice. Every setup keeps them in `dtype`.
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=implementation == "peft")
    else:  # full fine-tuning
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def adapter_dtype(model) -> str:
    """The dtype the LoRA matrices are stored in ('' where the model has none: full fine-tuning)."""
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_" in name or name.endswith(("W_a", "W_b"))):
            return str(p.dtype).replace("torch.", "")
    return ""


# ---------------------------------------------------------------- one measurement
def measure(model, point: Point, device: torch.device, warmup: int = 3, steps: int = 10, seed: int = 0,
            autocast: torch.dtype | None = None) -> dict:
    """Train ``warmup + steps`` steps on random tokens; median step time and peak memory.

    The optimizer is created fresh (its states appear at the first step, inside the measured peak)
    and dropped afterwards, so the next point starts from the model alone.
    """
    if warmup < 1 or steps < 1:
        raise ValueError(f"need at least one warm-up step and one timed step, got warmup={warmup}, steps={steps}")
    set_checkpointing(model, point.grad_ckpt)
    model.train()
    params = memory.trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameter")
    vocab = model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(seed)
    input_ids = torch.randint(0, vocab, (point.batch, point.seq), device=device, generator=generator)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _allocated(device)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    losses, times = [], []

    def timed_step():
        _sync(device)
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, input_ids, autocast))
        _sync(device)
        times.append(time.perf_counter() - start)

    for _ in range(warmup + steps - 1):
        timed_step()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    # the last step alone: what one step adds on top of the weights and the optimizer states
    state_bytes = sum(memory.tensor_bytes(t) for s in optimizer.state.values()
                      for t in s.values() if isinstance(t, torch.Tensor) and t.device.type == device.type)
    resting = _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_step()
    last_step_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peak = max(peak, last_step_peak)
    loss = float(losses[-1])
    optimizer = None  # its states go with it, before the next setup is measured
    set_checkpointing(model, False)
    _free(device)
    step_s = statistics.median(times[warmup:])
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss is {loss} at {point}: the setup is broken")
    return {"step_s": step_s, "tokens_per_s": point.batch * point.seq / step_s,
            "peak_bytes": peak, "before_bytes": before, "resting_bytes": resting, "optimizer_state_bytes": state_bytes,
            "last_step_extra_bytes": last_step_peak - resting, "loss": loss,
            "step_times": times[warmup:]}



# ---------------------------------------------------------------- the suite
def run_suite(config, shapes, grad_ckpt_options, setups, device, dtype, warmup=3, steps=10, r=16, alpha=32,
              profile_setups=(), log=print, command="python -m qlora_tutorial.bench", activations=True,
              on_setup_done=None) -> dict:
    """Measure every setup at every point; returns {'rows': CSV rows, 'extras': ..., 'failures': ...}."""
    points = [Point(b, s, g) for g in grad_ckpt_options for b, s in shapes]
    suite = {"rows": [], "extras": [], "failures": [], "profiles": {}, "provenance": provenance(device, command)}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        t0 = time.perf_counter()
        folder = save_random_model(config, Path(tmp) / "model", dtype, device)
        log(f"saved the randomly initialised model ({time.perf_counter() - t0:.1f} s)")
        for mode, impl in setups:
            base = _allocated(device)
            run_setup(suite, mode, impl, folder, config, shapes, points, device, dtype, base, warmup=warmup,
                      steps=steps, r=r, alpha=alpha, activations=activations,
                      profile=(mode, impl) in profile_setups, log=log)
            _check_released(suite["failures"], f"{mode}/{impl}", base, device, log)
            if on_setup_done is not None:
                on_setup_done(suite)
    return suite


def run_setup(suite: dict, mode, impl, folder, config, shapes, points, device, dtype, base, *, warmup, steps, r,
              alpha, activations, profile, log) -> None:
    """One setup: build it, count its activations, measure it at every point (rows and extras go
    into ``suite``), profile it if asked. Its model is gone when this returns."""
    t0 = time.perf_counter()
    model = build(mode, impl, folder, device, dtype, r=r, alpha=alpha)
    _free(device)
    built = _built(model, _allocated(device) - base)
    log(f"[{mode}/{impl}] built in {time.perf_counter() - t0:.1f} s: {built['trainable']:,} of {built['total']:,} "
        f"parameters train; weights {built['weights'] / GIB:.3f} GiB measured, "
        f"{built['computed']['weights'] / GIB:.3f} GiB computed")
    saved, estimate = {}, None
    if activations:
        saved, estimate = _activations(model, mode, impl, config, shapes, device, dtype, r, alpha, suite["failures"])
    for point in points:
        label = f"[{mode}/{impl}] batch {point.batch} x seq {point.seq}, grad_ckpt={point.grad_ckpt}"
        try:
            m = measure(model, point, device, warmup=warmup, steps=steps,
                        autocast=dtype if impl == "torch-amp" else None)
        except Exception as exc:  # e.g. out of memory: record it and go on
            suite["failures"].append({"setup": f"{mode}/{impl}", "point": point.__dict__,
                                      "error": f"{type(exc).__name__}: {exc}"[:500]})
            log(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            _free(device)
            continue
        suite["rows"].append(suite_row(mode, impl, point, m, built, device, suite["provenance"]))
        suite["extras"].append(suite_extras(mode, impl, point, m, built, saved, estimate, shapes[0]))
        peak = f", peak {m['peak_bytes'] / GIB:.2f} GiB" if device.type == "cuda" else ""
        log(f"{label}: {m['step_s'] * 1000:.1f} ms/step, {m['tokens_per_s']:,.0f} tokens/s{peak}, "
            f"loss {m['loss']:.3f}")
    if profile:
        _profile(model, mode, impl, Point(shapes[0][0], shapes[0][1], False), device, suite, log)


def _built(model, weights: int) -> dict:
    """What a setup's numbers share: its weights' bytes (measured and computed) and parameter counts."""
    from ..quantize import count_parameters

    trainable, total = count_parameters(model)
    return {"weights": weights, "trainable": trainable, "total": total, "computed": memory.breakdown(model),
            "adapter_dtype": adapter_dtype(model)}


def _activations(model, mode, impl, config, shapes, device, dtype, r, alpha, failures) -> tuple[dict, dict | None]:
    """Saved activations of one training forward at every shape, counted (no checkpointing), and for
    our layers and full fine-tuning the package's estimate at the first shape."""
    saved, estimate = {}, None
    if impl in ("ours", "torch"):  # the package's estimate, from 1- and 2-layer models
        b, s = shapes[0]
        try:
            estimate = memory.activation_estimate(config, memory.prepare_for(mode, r, alpha, dtype), b, s,
                                                  dtype=dtype, device=device)
        except Exception as exc:
            failures.append({"setup": f"{mode}/{impl}", "what": "activation estimate",
                             "error": f"{type(exc).__name__}: {exc}"[:500]})
        _free(device)
    for b, s in shapes:
        ids = torch.randint(0, config.vocab_size, (b, s), device=device)
        try:
            saved[f"{b}x{s}"] = memory.saved_activation_bytes(model, ids)
        except Exception as exc:  # a count that fails must not stop the timing
            failures.append({"setup": f"{mode}/{impl}", "what": f"saved activations {b}x{s}",
                             "error": f"{type(exc).__name__}: {exc}"})
        del ids
        _free(device)
    return saved, estimate


def suite_row(mode, impl, point: Point, m: dict, built: dict, device, provenance: dict) -> dict:
    """One CSV row of the suite (memory columns empty on a CPU, where nothing is measured)."""
    return {"mode": mode, "implementation": impl, "compiled": "eager", "optimizer": "adamw",
            "batch": point.batch, "seq": point.seq, "grad_ckpt": point.grad_ckpt,
            "step_s": round(m["step_s"], 5), "step_s_spread": "", "gpu_ms_per_step": "",
            "tokens_per_s": round(m["tokens_per_s"], 1),
            "peak_gib": round(m["peak_bytes"] / GIB, 4) if device.type == "cuda" else "",
            "weights_gib": round(built["weights"] / GIB, 4) if device.type == "cuda" else "",
            "trainable": built["trainable"], "adapter_dtype": built["adapter_dtype"], **provenance}


def suite_extras(mode, impl, point: Point, m: dict, built: dict, saved: dict, estimate: dict | None,
                 first_shape) -> dict:
    """The JSON's numbers behind one row: the memory breakdown measured, computed and estimated."""
    computed, first = built["computed"], (point.batch, point.seq) == first_shape
    return {"mode": mode, "implementation": impl, "batch": point.batch, "seq": point.seq,
            "grad_ckpt": point.grad_ckpt, "loss": m["loss"], "step_times": m["step_times"],
            "weights_bytes_measured": built["weights"], "weights_bytes_computed": computed["weights"],
            "gradient_bytes_computed": computed["gradients"],
            "optimizer_state_bytes_computed": computed["optimizer_states"],
            "optimizer_state_bytes_measured": m["optimizer_state_bytes"],
            "saved_activation_bytes_counted": saved.get(f"{point.batch}x{point.seq}")
            if not point.grad_ckpt else None,
            "saved_activation_bytes_estimated": estimate["activation_bytes"]
            if estimate and not point.grad_ckpt and first else None,
            "activation_estimate": estimate if first else None,
            "last_step_extra_bytes": m["last_step_extra_bytes"],
            "resting_bytes": m["resting_bytes"],
            "peak_bytes": m["peak_bytes"], "total_parameters": built["total"]}


def _profile(model, mode, impl, point: Point, device, suite: dict, log) -> None:
    try:
        prof = profile_steps(model, point, device)
        suite["profiles"][f"{mode}/{impl} {point.batch}x{point.seq}"] = prof
        log(f"[{mode}/{impl}] profiled at {point.batch}x{point.seq}: device busy "
            f"{prof['device_ms_per_step'] or 0:.1f} ms/step, CPU {prof['cpu_ms_per_step'] or 0:.1f} ms/step")
    except Exception as exc:
        suite["failures"].append({"setup": f"{mode}/{impl}", "what": "profile",
                                  "error": f"{type(exc).__name__}: {exc}"[:500]})


def _check_released(failures: list, label: str, base: int, device, log) -> None:
    """After a setup's model is deleted, nothing of it may stay allocated: the next setup's numbers
    would include it."""
    _free(device)
    left = _allocated(device) - base
    if left > 64 * 2 ** 20:
        failures.append({"setup": label, "what": "memory left after the setup was deleted", "bytes": left})
        log(f"[{label}] WARNING: {left / GIB:.2f} GiB still allocated after deleting the model")

"""The measured memory and speed suite: ``python -m qlora_tutorial.bench``.

What it measures (defaults: TinyLlama-1.1B's architecture, randomly initialised from its config,
no download; bf16 on a GPU; LoRA r=16, alpha=32 on every linear layer of the decoder; AdamW):

* training steps of five setups: full fine-tuning (``torch``), LoRA and QLoRA with our
  ``Qlora_4_bit`` (``ours``), LoRA and QLoRA with PEFT, the 4-bit base of PEFT's QLoRA loaded
  through transformers' ``BitsAndBytesConfig`` (``peft``); with and without gradient
  checkpointing; over a batch x sequence sweep. Per row: median step time after warm-up,
  tokens/s, peak allocated memory, weight memory, trainable parameters.
* NF4 dequantization of one weight (4096 x 11008 by default): our from-scratch path
  (``nf4.dequantize_nf4``, and ``nf4.dequantize_4bit_oneshot`` eager and ``torch.compile``d) against
  bitsandbytes' ``dequantize_4bit``, in GB/s and as a fraction of the measured copy bandwidth;
  and whether our CPU quantization gives the bytes bitsandbytes' kernel gives on the device.

Every setup loads the same random weights (saved once to a temporary folder), so the rows differ
only in the setup. Results: a CSV (one row per measurement, with provenance: device, versions,
date, command) and a JSON with the kernel numbers and per-row extras (memory breakdown, profile).

    python -m qlora_tutorial.bench --speed          # interleaved speed rounds: eager / compile / cudagraphs,
                                                    # GPU-busy time, torch-amp, paged and 8-bit AdamW
    python -m qlora_tutorial.bench --profile        # the full suite on a CUDA GPU -> book/data/
    python -m qlora_tutorial.bench --quick          # a tiny model and tiny shapes, any device -> _build/bench/

Only a full run on a GPU writes into ``book/data/``; anything else goes to ``_build/bench/`` unless
``--csv``/``--json`` say otherwise. Step times are wall-clock (the GPU synchronised around each
step); with LoRA at these sizes the GPU mostly waits for the host, so they vary between runs by
more than the GPU's work does: ``--profile`` records the GPU's busy time per step as well.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import memory
from .lora import TARGET_PRESETS
from .train import set_checkpointing  # non-reentrant: frozen embeddings still pass gradients to LoRA

# Relative to the current directory: the installed package knows no checkout, so a book run is made
# from the repository's root (or given --csv/--json).
CSV_PATH = Path("book") / "data" / "gpu_benchmark.csv"
KERNELS_PATH = Path("book") / "data" / "gpu_kernels.json"
CSV_COLUMNS = ["mode", "implementation", "compiled", "optimizer", "batch", "seq", "grad_ckpt", "step_s",
               "step_s_spread", "gpu_ms_per_step", "tokens_per_s", "peak_gib", "weights_gib", "trainable", "device",
               "torch", "bitsandbytes", "transformers", "peft", "date", "command"]
# what identifies a row: a later run replaces the rows of an earlier one with the same key
ROW_KEY = ("mode", "implementation", "compiled", "optimizer", "batch", "seq", "grad_ckpt")
# (mode, implementation) in the order they run. "torch": pure bf16 weights and bf16 AdamW;
# "torch-amp": what practitioners run, float32 master weights, bf16 autocast, float32 AdamW.
SETUPS = [("full", "torch"), ("full", "torch-amp"), ("lora", "ours"), ("lora", "peft"), ("qlora", "ours"),
          ("qlora", "peft")]
COMPILED = ("eager", "compile", "cudagraphs")
OPTIMIZERS = ("adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit")
# every linear layer of a Llama decoder layer (lm_head stays as it is, as PEFT's default does)
TARGETS = list(TARGET_PRESETS["all"])
GIB = 2 ** 30
# The repository (as in _config.yml; a test checks they agree): where Colab readers get book/data/ from.
REPOSITORY = "https://github.com/qlora-tutorial/qlora-tutorial"
RAW_DATA_URL = REPOSITORY.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/book/data"


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Point:
    """One measured shape: ``batch`` sequences of ``seq`` tokens, with or without checkpointing."""
    batch: int
    seq: int
    grad_ckpt: bool


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
    from transformers import LlamaConfig

    from .models import tinyllama_config

    if name == "tinyllama":
        config = tinyllama_config()
    elif name == "tiny":
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False)
    else:
        raise ValueError(f"unknown config {name!r}: use 'tinyllama' or 'tiny'")
    config.use_cache = False
    return config


def versions() -> dict:
    from .device import versions as all_versions

    v = all_versions()
    return {k: v[k] for k in ("torch", "bitsandbytes", "transformers", "peft")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- models
def save_random_model(config, folder: Path, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Path:
    """Initialise ``config``'s architecture randomly (on ``device``: fast) and save it, so every setup
    loads the very same weights (PEFT's 4-bit base can only come from ``from_pretrained``)."""
    from .models import build_from_config

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
    if (mode, implementation) == ("qlora", "peft"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)  # QLoRA as the paper defines it, and our layer's default
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    if implementation == "ours":
        from .quantize import quantize_model

        quantize_model(model, TARGETS, alpha, r, use_qlora=(mode == "qlora"), compute_dtype=dtype)
    elif implementation == "peft":
        from peft import LoraConfig, get_peft_model

        # No prepare_model_for_kbit_training: it would upcast the embeddings and norms to float32,
        # and we compare the layers, not that choice. Every setup keeps them in `dtype`.
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    else:  # full fine-tuning
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


# ---------------------------------------------------------------- one measurement
def train_step(model, optimizer, input_ids, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Forward with the language-model loss, backward, AdamW step, gradients freed.

    ``autocast``: run the forward (and the loss) under ``torch.autocast`` in that dtype (mixed precision).
    """
    if autocast is not None:
        with torch.autocast(input_ids.device.type, dtype=autocast):
            loss = model(input_ids=input_ids, labels=input_ids).loss
    else:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


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
    del optimizer
    set_checkpointing(model, False)
    _free(device)
    step_s = statistics.median(times[warmup:])
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss is {loss} at {point}: the setup is broken")
    return {"step_s": step_s, "tokens_per_s": point.batch * point.seq / step_s,
            "peak_bytes": peak, "before_bytes": before, "resting_bytes": resting, "optimizer_state_bytes": state_bytes,
            "last_step_extra_bytes": last_step_peak - resting, "loss": loss,
            "step_times": times[warmup:]}


# ---------------------------------------------------------------- profiling
def count_dispatched_ops(model, optimizer, input_ids) -> dict:
    """How many ATen operators one training step dispatches, by name: the host's share of a step.

    When the GPU waits for the host, a step costs roughly a fixed host time per operator; this
    count does not depend on timing noise. (A ``TorchDispatchMode`` sees every operator that
    reaches ATen, in the forward, the backward and the optimizer.)
    """
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Counting() as mode:
        train_step(model, optimizer, input_ids)
    return dict(mode.counts.most_common())


def profile_steps(model, point: Point, device: torch.device, steps: int = 3, row_limit: int = 15) -> dict:
    """Where a few training steps spend their time (torch.profiler): the busy time of the device
    and of the CPU per step, and a table of the top operators."""
    from torch.profiler import ProfilerActivity, profile

    set_checkpointing(model, point.grad_ckpt)
    model.train()
    optimizer = torch.optim.AdamW(memory.trainable_parameters(model), lr=1e-5)
    input_ids = torch.randint(0, model.config.vocab_size, (point.batch, point.seq), device=device)
    train_step(model, optimizer, input_ids)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(model, optimizer, input_ids)
        _sync(device)
    del optimizer
    set_checkpointing(model, False)
    _free(device)
    averages = prof.key_averages()
    table = None
    for sort in (["device_time_total", "cuda_time_total"] if device.type == "cuda" else []) + ["cpu_time_total"]:
        try:
            table = averages.table(sort_by=sort, row_limit=row_limit, max_name_column_width=60)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    return {**table_totals(table, steps), "steps": steps, "table": table}


def table_totals(table: str, steps: int) -> dict:
    """Busy time per step of the device and of the CPU, read off the totals under a profiler table.

    (Those totals count kernels once; summing the averages' device times instead would also count
    the annotations, e.g. ``Optimizer.step``, that span kernels already counted.)
    """
    import re

    out = {}
    for key, pattern in (("cpu_ms_per_step", r"Self CPU time total: ([\d.]+)(ms|us|s)\b"),
                         ("device_ms_per_step", r"Self (?:CUDA|Device|XPU) time total: ([\d.]+)(ms|us|s)\b")):
        match = re.search(pattern, table or "")
        if match:
            value = float(match.group(1)) * {"s": 1000, "ms": 1, "us": 1e-3}[match.group(2)]
            out[key] = value / steps
        else:
            out[key] = None
    return out


# ---------------------------------------------------------------- the suite
def run_suite(config, shapes, grad_ckpt_options, setups, device, dtype, warmup=3, steps=10, r=16, alpha=32,
              profile_setups=(), log=print, command="python -m qlora_tutorial.bench", activations=True,
              on_setup_done=None) -> dict:
    """Measure every setup at every point; returns {'rows': CSV rows, 'extras': ..., 'failures': ...}."""
    from .quantize import count_parameters

    v = versions()
    provenance = {"device": device_name(device), **v, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                  "command": command}
    points = [Point(b, s, g) for g in grad_ckpt_options for b, s in shapes]
    rows, extras, failures, profiles = [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        t0 = time.perf_counter()
        folder = save_random_model(config, Path(tmp) / "model", dtype, device)
        log(f"saved the randomly initialised model ({time.perf_counter() - t0:.1f} s)")
        for mode, impl in setups:
            t0 = time.perf_counter()
            base = _allocated(device)
            model = build(mode, impl, folder, device, dtype, r=r, alpha=alpha)
            _free(device)
            weights = _allocated(device) - base
            trainable, total = count_parameters(model)
            computed = memory.breakdown(model)
            log(f"[{mode}/{impl}] built in {time.perf_counter() - t0:.1f} s: {trainable:,} of {total:,} parameters "
                f"train; weights {weights / GIB:.3f} GiB measured, {computed['weights'] / GIB:.3f} GiB computed")
            saved, estimate = {}, None
            if activations and impl in ("ours", "torch"):  # the package's estimate, from 1- and 2-layer models
                b, s = shapes[0]
                try:
                    estimate = memory.activation_estimate(config, memory.prepare_for(mode, r, alpha, dtype), b, s,
                                                          dtype=dtype, device=device)
                except Exception as exc:
                    failures.append({"setup": f"{mode}/{impl}", "what": "activation estimate",
                                     "error": f"{type(exc).__name__}: {exc}"[:500]})
                _free(device)
            if activations:
                for b, s in shapes:  # saved activations of one training forward, counted (no checkpointing)
                    ids = torch.randint(0, config.vocab_size, (b, s), device=device)
                    try:
                        saved[f"{b}x{s}"] = memory.saved_activation_bytes(model, ids)
                    except Exception as exc:  # a count that fails must not stop the timing
                        failures.append({"setup": f"{mode}/{impl}", "what": f"saved activations {b}x{s}",
                                         "error": f"{type(exc).__name__}: {exc}"})
                    del ids
                    _free(device)
            for point in points:
                label = f"[{mode}/{impl}] batch {point.batch} x seq {point.seq}, grad_ckpt={point.grad_ckpt}"
                try:
                    m = measure(model, point, device, warmup=warmup, steps=steps,
                                autocast=dtype if impl == "torch-amp" else None)
                except Exception as exc:  # e.g. out of memory: record it and go on
                    failures.append({"setup": f"{mode}/{impl}", "point": point.__dict__,
                                     "error": f"{type(exc).__name__}: {exc}"[:500]})
                    log(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                    _free(device)
                    continue
                row = {"mode": mode, "implementation": impl, "compiled": "eager", "optimizer": "adamw",
                       "batch": point.batch, "seq": point.seq, "grad_ckpt": point.grad_ckpt,
                       "step_s": round(m["step_s"], 5), "step_s_spread": "", "gpu_ms_per_step": "",
                       "tokens_per_s": round(m["tokens_per_s"], 1),
                       "peak_gib": round(m["peak_bytes"] / GIB, 4) if device.type == "cuda" else "",
                       "weights_gib": round(weights / GIB, 4) if device.type == "cuda" else "",
                       "trainable": trainable, **provenance}
                rows.append(row)
                extras.append({"mode": mode, "implementation": impl, "batch": point.batch, "seq": point.seq,
                               "grad_ckpt": point.grad_ckpt, "loss": m["loss"], "step_times": m["step_times"],
                               "weights_bytes_measured": weights, "weights_bytes_computed": computed["weights"],
                               "gradient_bytes_computed": computed["gradients"],
                               "optimizer_state_bytes_computed": computed["optimizer_states"],
                               "optimizer_state_bytes_measured": m["optimizer_state_bytes"],
                               "saved_activation_bytes_counted": saved.get(f"{point.batch}x{point.seq}")
                               if not point.grad_ckpt else None,
                               "saved_activation_bytes_estimated": estimate["activation_bytes"]
                               if estimate and not point.grad_ckpt and (point.batch, point.seq) == shapes[0] else None,
                               "activation_estimate": estimate if (point.batch, point.seq) == shapes[0] else None,
                               "last_step_extra_bytes": m["last_step_extra_bytes"],
                               "resting_bytes": m["resting_bytes"],
                               "peak_bytes": m["peak_bytes"], "total_parameters": total})
                peak = f", peak {m['peak_bytes'] / GIB:.2f} GiB" if device.type == "cuda" else ""
                log(f"{label}: {m['step_s'] * 1000:.1f} ms/step, {m['tokens_per_s']:,.0f} tokens/s{peak}, "
                    f"loss {m['loss']:.3f}")
            if (mode, impl) in profile_setups:
                point = Point(shapes[0][0], shapes[0][1], False)
                try:
                    prof = profile_steps(model, point, device)
                    profiles[f"{mode}/{impl} {point.batch}x{point.seq}"] = prof
                    log(f"[{mode}/{impl}] profiled at {point.batch}x{point.seq}: device busy "
                        f"{prof['device_ms_per_step'] or 0:.1f} ms/step, CPU {prof['cpu_ms_per_step'] or 0:.1f} ms/step")
                except Exception as exc:
                    failures.append({"setup": f"{mode}/{impl}", "what": "profile", "error": f"{type(exc).__name__}: {exc}"[:500]})
            del model
            _free(device)
            left = _allocated(device) - base
            if left > 64 * 2 ** 20:  # the next setup's numbers would include this
                failures.append({"setup": f"{mode}/{impl}", "what": "memory left after the setup was deleted",
                                 "bytes": left})
                log(f"[{mode}/{impl}] WARNING: {left / GIB:.2f} GiB still allocated after deleting the model")
            if on_setup_done is not None:
                on_setup_done({"rows": rows, "extras": extras, "failures": failures, "profiles": profiles,
                               "provenance": provenance})
    return {"rows": rows, "extras": extras, "failures": failures, "profiles": profiles, "provenance": provenance}


# ---------------------------------------------------------------- speed, measured honestly
@dataclass(frozen=True)
class Setup:
    """One configuration of the speed runs: what trains, whose layers, how it runs, which optimizer.

    ``compiled``: ``eager``; ``compile`` (``fast.compile_for_training``: each decoder layer
    compiled); ``cudagraphs`` (compiled as well, and the whole step recorded as one CUDA graph with
    ``fast.CapturedStep``).
    """
    mode: str
    implementation: str
    compiled: str = "eager"
    optimizer: str = "adamw"

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.implementation}/{self.compiled}/{self.optimizer}"


def parse_speed_setups(text: str) -> list[Setup]:
    """'qlora/ours/cudagraphs,full/torch-amp' -> Setups (compiled defaults to eager, optimizer to adamw)."""
    out = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) < 2 or len(parts) > 4 or tuple(parts[:2]) not in SETUPS:
            raise ValueError(f"unknown setup {item!r}: MODE/IMPLEMENTATION[/COMPILED[/OPTIMIZER]] with MODE/"
                             f"IMPLEMENTATION one of {', '.join(m + '/' + i for m, i in SETUPS)}")
        setup = Setup(*parts)
        if setup.compiled not in COMPILED:
            raise ValueError(f"{item!r}: compiled must be one of {COMPILED}")
        if setup.optimizer not in OPTIMIZERS:
            raise ValueError(f"{item!r}: optimizer must be one of {OPTIMIZERS}")
        if setup.optimizer != "adamw" and setup.compiled == "cudagraphs":
            raise ValueError(f"{item!r}: bitsandbytes' optimizers are not recorded in CUDA graphs here; use adamw")
        out.append(setup)
    return out


# the default speed comparison: every setup in every mode that applies; optimizer variants for memory
# (most important first: a run cut short by its time budget still has them)
DEFAULT_SPEED_SETUPS = ",".join(
    ["qlora/ours/compile", "lora/ours/compile", "qlora/peft/compile", "lora/peft/compile", "qlora/ours/eager",
     "lora/ours/eager", "qlora/peft/eager", "lora/peft/eager", "full/torch-amp", "full/torch",
     "qlora/ours/eager/paged_adamw", "qlora/ours/eager/adamw8bit", "full/torch-amp/eager/adamw8bit",
     "full/torch-amp/eager/paged_adamw8bit",
     # last: a recording that fails leaves the CUDA random generator unusable for later setups' init
     "qlora/ours/cudagraphs", "lora/ours/cudagraphs", "qlora/peft/cudagraphs", "lora/peft/cudagraphs"])


def make_optimizer(name: str, params, capturable: bool = False, lr: float = 1e-5):
    """AdamW (PyTorch's), or bitsandbytes' paged / 8-bit AdamW (its states in managed memory / 8 bits)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, capturable=capturable)
    import bitsandbytes as bnb

    cls = {"paged_adamw": bnb.optim.PagedAdamW, "adamw8bit": bnb.optim.AdamW8bit,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr)


def gpu_busy_ms(step, steps: int, device: torch.device) -> float | None:
    """Milliseconds per step the GPU spends running kernels (and copies), from the profiler.

    The sum of the device's own time over every event (the total under the profiler's table): idle
    gaps, where the GPU waits for the host, do not count. ``None`` on a CPU.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1000 / steps


class Prepared:
    """A setup built, compiled and warmed up: ``step()`` runs one training step on the fixed batch."""

    def __init__(self, setup: Setup, folder: Path, device: torch.device, dtype: torch.dtype, point: Point,
                 r: int, alpha: float, warmup: int, seed: int = 0):
        from . import fast
        from .quantize import count_parameters

        self.setup = setup
        base = _allocated(device)
        self.model = build(setup.mode, setup.implementation, folder, device, dtype, r=r, alpha=alpha)
        _free(device)
        self.weights = _allocated(device) - base
        if device.type == "cuda":  # the peak of training, not of loading (which may briefly hold more)
            torch.cuda.reset_peak_memory_stats(device)
        self.trainable, self.total = count_parameters(self.model)
        self.model.train()
        self.autocast = dtype if setup.implementation == "torch-amp" else None
        generator = torch.Generator(device=device).manual_seed(seed)
        self.input_ids = torch.randint(0, self.model.config.vocab_size, (point.batch, point.seq), device=device,
                                       generator=generator)
        t0 = time.perf_counter()
        # cudagraphs records the compiled model, unless QLORA_BENCH_CUDAGRAPHS_OVER=eager says to record it eager
        over = os.environ.get("QLORA_BENCH_CUDAGRAPHS_OVER", "compile")
        if setup.compiled == "compile" or (setup.compiled == "cudagraphs" and over == "compile"):
            fast.compile_for_training(self.model)
        self.optimizer = make_optimizer(setup.optimizer, memory.trainable_parameters(self.model),
                                        capturable=setup.compiled == "cudagraphs")
        self.note = None
        if setup.compiled == "cudagraphs":
            try:
                self.captured = fast.CapturedStep(self.model, self.optimizer, warmup=warmup, autocast=self.autocast,
                                                  input_ids=self.input_ids, labels=self.input_ids)
            except Exception as exc:
                if over != "compile":
                    raise
                # recording the compiled model failed: record the eager one instead, and say so
                self.note = f"recorded eager: recording the compiled model failed with {type(exc).__name__}: {exc}"[:600]
                del self.optimizer, self.model
                _free(device)
                if device.type == "cuda":  # the failed attempt's peak is not this setup's
                    torch.cuda.reset_peak_memory_stats(device)
                self.model = build(setup.mode, setup.implementation, folder, device, dtype, r=r, alpha=alpha)
                _free(device)
                self.weights = _allocated(device) - base
                self.model.train()
                self.optimizer = make_optimizer(setup.optimizer, memory.trainable_parameters(self.model),
                                                capturable=True)
                self.captured = fast.CapturedStep(self.model, self.optimizer, warmup=warmup, autocast=self.autocast,
                                                  input_ids=self.input_ids, labels=self.input_ids)
            self.step = lambda: self.captured(input_ids=self.input_ids, labels=self.input_ids)
        else:
            self.step = lambda: train_step(self.model, self.optimizer, self.input_ids, self.autocast)
            for _ in range(warmup):
                self.step()
        self.step()
        _sync(device)
        self.prepare_s = time.perf_counter() - t0
        # everything this setup allocated at its peak: weights, optimizer states, activations (and a
        # CUDA graph's memory pool); other setups stay resident but do not allocate meanwhile
        self.peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else 0
        self.loss = float(self.step())
        if not math.isfinite(self.loss):
            raise RuntimeError(f"{setup.label}: the loss is {self.loss}: the setup is broken")


def run_rounds(config, point: Point, setups: list[Setup], device, dtype, rounds: int = 5, steps: int = 10,
               warmup: int = 3, profile_steps_per_round: int = 3, r: int = 16, alpha: float = 32, log=print,
               command: str = "python -m qlora_tutorial.bench --speed", on_round_done=None,
               time_budget_s: float | None = None, profile_rounds=(0,)) -> dict:
    """Every setup built once and kept resident, then timed in ``rounds`` interleaved rounds.

    In each round every setup runs ``steps`` steps, each timed on the wall clock (the GPU
    synchronised around it), in an order that rotates from round to round; in the rounds listed in
    ``profile_rounds`` the profiler then records ``profile_steps_per_round`` more to get the GPU's
    busy time (the GPU's work per step hardly varies; the profiler's start-up costs seconds). A row reports the median
    over rounds of each round's median step, its spread (largest minus smallest round median), and
    the median GPU-busy time. Slow drifts of the host (other load, clocks) hit every setup alike.

    ``time_budget_s``: no further setup is prepared after 60% of it, no further round started after
    90% (each round's results are saved as they come, through ``on_round_done``).
    """
    started = time.perf_counter()
    over = lambda fraction: time_budget_s is not None and time.perf_counter() - started > fraction * time_budget_s  # noqa: E731
    v = versions()
    provenance = {"device": device_name(device), **v, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                  "command": command}
    prepared, failures = [], []
    times = {s: [] for s in setups}
    gpu = {s: [] for s in setups}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        folder = save_random_model(config, Path(tmp) / "model", dtype, device)
        for setup in setups:
            if over(0.6):
                failures.append({"setup": setup.label, "what": "skipped: time budget"})
                log(f"[{setup.label}] skipped: time budget")
                continue
            try:
                p = Prepared(setup, folder, device, dtype, point, r, alpha, warmup)
            except Exception as exc:  # a mode that does not work for a setup: record it and go on
                failures.append({"setup": setup.label, "what": "prepare", "error": f"{type(exc).__name__}: {exc}"[:800]})
                log(f"[{setup.label}] FAILED to prepare: {type(exc).__name__}: {str(exc)[:300]}")
                _free(device)
                continue
            prepared.append(p)
            if p.note:
                failures.append({"setup": setup.label, "what": "note", "error": p.note})
            log(f"[{setup.label}] ready in {p.prepare_s:.1f} s: weights {p.weights / GIB:.3f} GiB, "
                f"peak {p.peak / GIB:.3f} GiB, loss {p.loss:.3f}")
    result = {"rows": [], "failures": failures, "provenance": provenance}
    for k in range(rounds):
        if k and over(0.9):
            log(f"stopped after {k} rounds: time budget")
            break
        order = prepared[k % len(prepared):] + prepared[:k % len(prepared)] if prepared else []
        for p in order:
            try:
                per_step = []
                for _ in range(steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    p.step()
                    _sync(device)
                    per_step.append(time.perf_counter() - t0)
                times[p.setup].append(statistics.median(per_step))
                if profile_steps_per_round and k in profile_rounds:
                    gpu[p.setup].append(gpu_busy_ms(p.step, profile_steps_per_round, device))
            except Exception as exc:
                failures.append({"setup": p.setup.label, "what": f"round {k}", "error": f"{type(exc).__name__}: {exc}"[:800]})
                log(f"[{p.setup.label}] FAILED in round {k}: {type(exc).__name__}: {str(exc)[:300]}")
        result["rows"] = [_speed_row(p, times[p.setup], gpu[p.setup], point, device, provenance)
                          for p in prepared if times[p.setup]]
        result["round_times"] = {p.setup.label: times[p.setup] for p in prepared}
        result["round_gpu_ms"] = {p.setup.label: gpu[p.setup] for p in prepared}
        log(f"round {k + 1}/{rounds} done")
        if on_round_done is not None:
            on_round_done(result)
    return result


def _speed_row(p: Prepared, round_times: list, round_gpu: list, point: Point, device, provenance) -> dict:
    step_s = statistics.median(round_times)
    busy = [g for g in round_gpu if g is not None]
    s = p.setup
    return {"mode": s.mode, "implementation": s.implementation, "compiled": s.compiled, "optimizer": s.optimizer,
            "batch": point.batch, "seq": point.seq, "grad_ckpt": point.grad_ckpt, "step_s": round(step_s, 5),
            # a spread needs two rounds at least: one round leaves it empty rather than 0
            "step_s_spread": round(max(round_times) - min(round_times), 5) if len(round_times) > 1 else "",
            "gpu_ms_per_step": round(statistics.median(busy), 3) if busy else "",
            "tokens_per_s": round(point.batch * point.seq / step_s, 1),
            "peak_gib": round(p.peak / GIB, 4) if device.type == "cuda" else "",
            "weights_gib": round(p.weights / GIB, 4) if device.type == "cuda" else "",
            "trainable": p.trainable, **provenance}


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every row that ``new`` measures again replaced (same ``ROW_KEY``), plus ``new``'s others."""
    key = lambda r: tuple(str(r[k]) for k in ROW_KEY)  # noqa: E731
    fresh = {key(r): r for r in new}
    out = [fresh.pop(key(r), r) for r in old]
    return out + [r for r in new if key(r) in fresh]


def speed_targets(rows: list[dict]) -> list[dict]:
    """The targets of the speed work, checked on rows of one run (ours vs PEFT, QLoRA vs LoRA, GPU floor)."""
    idx = {(r["mode"], r["implementation"], r["compiled"]): r for r in rows
           if r["optimizer"] == "adamw" and not r["grad_ckpt"]}
    out = []

    def check(name, value, limit):
        if value is not None and math.isfinite(value):
            out.append({"target": name, "value": round(value, 4), "limit": limit, "ok": value <= limit})

    def get(mode, impl, compiled, key="step_s"):
        r = idx.get((mode, impl, compiled))
        return None if r is None or r[key] in ("", None) else float(r[key])

    ours_q = {c: get("qlora", "ours", c) for c in COMPILED}
    fastest = min((c for c in COMPILED if ours_q[c] is not None), key=lambda c: ours_q[c], default=None)
    if fastest is not None:
        peft_compiled = get("qlora", "peft", "compile")
        if peft_compiled:
            check(f"ours QLoRA {fastest} step / PEFT QLoRA compile step", ours_q[fastest] / peft_compiled, 0.35)
        busy = get("qlora", "ours", fastest, "gpu_ms_per_step")
        if busy:
            check(f"ours QLoRA {fastest}: wall-clock / GPU-busy", ours_q[fastest] * 1000 / busy, 1.15)
        lora_busy = get("lora", "ours", fastest, "gpu_ms_per_step")
        if busy and lora_busy:
            check(f"ours QLoRA / ours LoRA GPU-busy ({fastest})", busy / lora_busy, 1.05)
    for mode in ("lora", "qlora"):
        for c in COMPILED:
            ours, peft = get(mode, "ours", c), get(mode, "peft", c)
            if ours and peft:
                check(f"{mode} {c}: ours / PEFT step", ours / peft, 0.95)
                om, pm = get(mode, "ours", c, "peak_gib"), get(mode, "peft", c, "peak_gib")
                if om and pm:
                    check(f"{mode} {c}: ours / PEFT peak memory", om / pm, 0.85)
    return out


# ---------------------------------------------------------------- NF4 dequantization
def time_fn(fn, args_list, device: torch.device, warmup: int = 5, repeat: int = 30, inner: int = 10) -> float:
    """Median seconds per call of ``fn(*args)``, cycling through ``args_list`` (different buffers, so
    each call reads from memory, not from the cache).

    On a GPU, ``inner`` calls are queued between two CUDA events and the time divided by ``inner``:
    that keeps the device busy, so the number is the kernels' time, not Python's launch overhead.
    """
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    _sync(device)
    times = []
    for i in range(repeat):
        batch = [args_list[(i * inner + j) % len(args_list)] for j in range(inner)]
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for args in batch:
                fn(*args)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000 / inner)
        else:
            t0 = time.perf_counter()
            for args in batch:
                fn(*args)
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 2 * GIB, repeat: int = 20) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda a, b: b.copy_(a), [(src, dst)], device, warmup=3, repeat=repeat, inner=5)
    del src, dst
    return 2 * nbytes / seconds


TRITON_CONFIGS = ((512, 4), (1024, 4), (2048, 4), (2048, 8), (4096, 8))


def kernel_benchmark(device: torch.device, shape=(4096, 11008), dtype: torch.dtype = torch.bfloat16,
                     compile: bool = True, copies: int = 4, repeat: int = 50, log=print, copy_bytes: int = 2 * GIB,
                     triton_configs=TRITON_CONFIGS) -> dict:
    """NF4 dequantization of one ``shape`` weight: ours (eager, one-shot, compiled) vs bitsandbytes.

    Bytes moved per dequantization: the packed weight (n/2), the absmax constants (4 bytes per
    block of 64) and the output (n * 2 bytes in bf16). Also checks that our quantization on the CPU
    gives bitsandbytes' bytes on ``device`` for the same weight.
    """
    import bitsandbytes.functional as bnbF

    from . import nf4

    generator = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(shape, device=device, generator=generator) * 0.02).to(dtype)
    n = weight.numel()
    packed_b, state_b = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed_o, state_o = nf4.quantize_nf4(weight)  # our from-scratch code, run on the same device
    cpu_packed, cpu_state = nf4.quantize_nf4(weight.cpu())
    bytes_check = {
        "weight": f"randn{tuple(shape)} * 0.02 in {str(dtype).replace('torch.', '')}",
        "ours_on_device_equal_bnb_device": bool(torch.equal(packed_o, packed_b)
                                                and torch.equal(state_o.absmax, state_b.absmax)),
        "ours_cpu_equal_bnb_device_packed": bool(torch.equal(cpu_packed, packed_b.cpu())),
        "ours_cpu_equal_bnb_device_absmax": bool(torch.equal(cpu_state.absmax, state_b.absmax.cpu())),
        "differing_packed_bytes": int((cpu_packed != packed_b.cpu()).sum()),
        "packed_bytes": int(packed_b.numel()),
    }
    # double quantization: our CPU code against bitsandbytes on the device
    packed_b2, state_b2 = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    cpu_packed2, cpu_state2 = nf4.quantize_nf4(weight.cpu(), double_quant=True)
    bytes_check["double_quant_packed_equal"] = bool(torch.equal(cpu_packed2, packed_b2.cpu()))
    bytes_check["double_quant_absmax_codes_equal"] = bool(torch.equal(cpu_state2.absmax, state_b2.absmax.cpu()))
    bytes_check["double_quant_differing_absmax_codes"] = int((cpu_state2.absmax != state_b2.absmax.cpu()).sum())
    bytes_check["absmax_codes"] = int(state_b2.absmax.numel())
    # our CPU code reproduces bitsandbytes' CPU kernel, which rounds through a 65,536-entry table;
    # the textbook rule (nearest code value) is what a GPU kernel can afford to do exactly
    textbook, _, _ = nf4.double_quantize(cpu_state.absmax, lut=False)
    bytes_check["double_quant_textbook_differing_absmax_codes"] = int((textbook != state_b2.absmax.cpu()).sum())
    del packed_b2, state_b2, cpu_packed2, cpu_state2

    reference = bnbF.dequantize_4bit(packed_b, state_b)
    moved = packed_b.numel() + state_b.absmax.numel() * 4 + n * weight.element_size()
    # several copies of the inputs, used in turn, so each run reads from memory rather than the cache
    inputs_b = [(packed_b.clone(), _clone_state(state_b)) for _ in range(copies)]
    inputs_o = [(p.clone(), s) for p, s in [(packed_o, state_o)] * copies]
    oneshot_args = [(p, state_o.absmax.clone(), state_o.code, 64, tuple(shape), dtype) for p, _ in inputs_o]

    variants = [("bitsandbytes dequantize_4bit", lambda p, s: bnbF.dequantize_4bit(p, s), inputs_b),
                ("ours nf4.dequantize_nf4 (eager, chunked)", nf4.dequantize_nf4, inputs_o),
                ("ours one-shot (eager)", nf4.dequantize_4bit_oneshot, oneshot_args)]
    if compile:
        variants.append(("ours one-shot (torch.compile)", torch.compile(nf4.dequantize_4bit_oneshot), oneshot_args))
    from . import nf4_triton

    triton_ok = device.type == "cuda" and nf4_triton.triton_available()
    if triton_ok:  # our from-scratch kernel, at a few tile sizes (packed bytes per program, warps)
        for nbytes, warps in triton_configs:
            variants.append((f"ours Triton kernel (nf4_triton, {nbytes} bytes x {warps} warps)",
                             lambda p, s, nb=nbytes, w=warps: nf4_triton.dequantize_triton(
                                 p, *nf4_triton.state_args(s)[:-2], s.shape, dtype, bytes_per_program=nb,
                                 num_warps=w), inputs_b))
        variants.append(("ours Triton kernel (custom op, default tiles)",
                         lambda p, s: nf4_triton.dequantize_like_bnb(p, s), inputs_b))
    copy_bps = copy_bandwidth(device, copy_bytes) if device.type == "cuda" else float("nan")

    def run(variants, moved, reference):
        rows = []
        for name, fn, args_list in variants:
            t0 = time.perf_counter()
            out = fn(*args_list[0])
            first_call_s = time.perf_counter() - t0
            equal = bool(torch.equal(out, reference))
            del out
            seconds = time_fn(fn, args_list, device, repeat=repeat)
            gbps = moved / seconds / 1e9
            rows.append({"implementation": name, "seconds": seconds, "GBps": gbps,
                         "fraction_of_copy": gbps * 1e9 / copy_bps if math.isfinite(copy_bps) else None,
                         "equal_to_bitsandbytes": equal, "first_call_s": first_call_s})
            log(f"  {name:56s} {seconds * 1e6:9.1f} us  {gbps:8.1f} GB/s  equal={equal}")
        return rows

    rows = run(variants, moved, reference)
    # double quantization (QLoRA as the paper defines it): 8-bit absmax codes, float32 second-level scales
    packed_n, state_n = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    reference_n = bnbF.dequantize_4bit(packed_n, state_n)
    moved_n = (packed_n.numel() + state_n.absmax.numel() + state_n.state2.absmax.numel() * 4
               + n * weight.element_size())
    inputs_n = [(packed_n.clone(), _clone_state(state_n)) for _ in range(copies)]
    variants_n = [("bitsandbytes dequantize_4bit, double-quantized", lambda p, s: bnbF.dequantize_4bit(p, s), inputs_n)]
    if triton_ok:
        variants_n.append(("ours Triton kernel, double-quantized (custom op)",
                           lambda p, s: nf4_triton.dequantize_like_bnb(p, s), inputs_n))
    rows_n = run(variants_n, moved_n, reference_n)
    if triton_ok:
        bytes_check["triton_equal_bnb"] = triton_exactness(device)
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "blocksize": 64,
            "bytes_moved_per_dequantization": moved, "copy_GBps": copy_bps / 1e9 if math.isfinite(copy_bps) else None,
            "rows": rows, "double_quant": {"bytes_moved_per_dequantization": moved_n, "rows": rows_n},
            "bytes_check": bytes_check}


def triton_exactness(device: torch.device, trials: int = 3) -> dict:
    """Our Triton kernel against bitsandbytes' CUDA dequantization, on fresh random weights of awkward
    shapes (odd counts, rows not a multiple of the block), each dtype, with and without double
    quantization, and a poisoned output buffer (every element must be written): exact equality."""
    import bitsandbytes.functional as bnbF

    from . import nf4_triton

    results = {}
    shapes = [(4096, 11008), (256, 2048), (3, 65), (7, 333), (1, 1), (129, 64)]
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for nested in (False, True):
                equal = True
                for t in range(trials):
                    g = torch.Generator(device=device).manual_seed(1000 * t + shape[0] + shape[1])
                    w = (torch.randn(shape, device=device, generator=g) * (0.01 + t)).to(dtype)
                    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
                    ref = bnbF.dequantize_4bit(packed, state)
                    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
                    nf4_triton.dequantize_triton(packed, *nf4_triton.state_args(state)[:-2], shape, dtype, out=out)
                    equal &= bool(torch.equal(out, ref))
                results[f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} nested={nested}"] = equal
    return {"all_equal": all(results.values()), "cases": results}


def _clone_state(state):
    import copy

    s = copy.copy(state)
    s.absmax = state.absmax.clone()
    return s


# ---------------------------------------------------------------- output
def data_text(name: str) -> str:
    """A file of ``book/data/`` as text: from the checkout the current directory is in (the root, or
    ``book/`` where chapters run), else (e.g. on Colab, where only the package is installed)
    downloaded from the repository. The data lives in one place."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        local = folder / "book" / "data" / name
        if local.is_file():
            return local.read_text()
    import urllib.request

    url = f"{RAW_DATA_URL}/{name}"
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (a fixed https address)
        return response.read().decode("utf-8")


def load_benchmark() -> list[dict]:
    """The measured rows of ``book/data/gpu_benchmark.csv``."""
    return parse_csv(data_text(CSV_PATH.name))


def load_kernels() -> dict:
    """``book/data/gpu_kernels.json``: kernel numbers, per-row extras, profiles, provenance."""
    return json.loads(data_text(KERNELS_PATH.name))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def read_csv(path: Path) -> list[dict]:
    """The benchmark CSV back, with numbers as numbers and grad_ckpt as a bool."""
    return parse_csv(Path(path).read_text())


def parse_csv(text: str) -> list[dict]:
    """Rows of the benchmark CSV given as text (numbers as numbers, grad_ckpt as a bool)."""
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and list(rows[0]) != CSV_COLUMNS:
        raise ValueError(f"not a benchmark CSV: its columns are {list(rows[0])}, expected {CSV_COLUMNS}")
    for row in rows:
        for key in ("batch", "seq", "trainable"):
            row[key] = int(row[key])
        for key in ("step_s", "step_s_spread", "gpu_ms_per_step", "tokens_per_s", "peak_gib", "weights_gib"):
            row[key] = float(row[key]) if row[key] != "" else float("nan")
        row["grad_ckpt"] = row["grad_ckpt"] == "True"
    return rows


def _number(x) -> float:
    """A CSV cell as a float; an empty cell (no memory measured on a CPU) is NaN."""
    return float("nan") if x in ("", None) else float(x)


def compare(rows: list[dict], time_tol: float = 0.05, memory_tol: float = 0.02) -> list[dict]:
    """Ours against PEFT at every point both measured: ratios and whether the targets hold.

    Target: our step time at most ``time_tol`` (5%) above PEFT's, our peak memory at most
    ``memory_tol`` (2%) above PEFT's.
    """
    def key(r, impl):
        return (r["mode"], impl, r.get("compiled", "eager"), r.get("optimizer", "adamw"), r["batch"], r["seq"],
                r["grad_ckpt"])

    index = {key(r, r["implementation"]): r for r in rows}
    out = []
    for k, ours in index.items():
        if ours["implementation"] != "ours":
            continue
        peft = index.get(key(ours, "peft"))
        if peft is None:
            continue
        time_ratio = ours["step_s"] / peft["step_s"]
        mem_ratio = _number(ours["peak_gib"]) / _number(peft["peak_gib"])
        out.append({"mode": ours["mode"], "compiled": ours.get("compiled", "eager"), "batch": ours["batch"],
                    "seq": ours["seq"], "grad_ckpt": ours["grad_ckpt"], "time_ratio": time_ratio,
                    "memory_ratio": mem_ratio, "time_ok": time_ratio <= 1 + time_tol,
                    "memory_ok": not (mem_ratio > 1 + memory_tol)})
    return out


def speed_main(args, config, shape, device, dtype, warmup, steps, kernel_shape, command, log) -> int:
    """``--speed``: the NF4 kernels, then the interleaved rounds; the CSV rows are merged into ``--csv``
    (rows with the same key replaced), the rest goes to ``--json`` (``gpu_speed.json`` by default)."""
    setups = parse_speed_setups(args.speed_setups)
    point = Point(shape[0], shape[1], False)
    # every compiled setup is a variant of the decoder layer's code: allow them all their own graphs
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    json_path = args.json if args.json is not None and args.json.name != KERNELS_PATH.name else None
    json_path = json_path or args.csv.parent / "gpu_speed.json"
    meta = {"python": sys.version.split()[0], "config": args.config or ("tiny" if args.quick else "tinyllama"),
            "r": args.r, "alpha": args.alpha, "warmup": warmup, "steps_per_round": steps, "rounds": args.rounds,
            "dtype": str(dtype).replace("torch.", ""), "targets": TARGETS, "triton": _triton_version(),
            "note": "step_s: median over rounds of each round's median wall-clock step (GPU synchronised "
                    "around each step); step_s_spread: largest minus smallest round median; gpu_ms_per_step: "
                    "the profiler's device time per step (kernels and copies, idle gaps excluded), median over "
                    "rounds. peak_gib: torch.cuda.max_memory_allocated over preparation and warm-up, minus what "
                    "was allocated before the setup was built; bitsandbytes' paged optimizers keep their states "
                    "in CUDA managed memory, which PyTorch's allocator does not count. compiled=cudagraphs: the "
                    "whole step recorded with fast.CapturedStep over the model as QLORA_BENCH_CUDAGRAPHS_OVER "
                    "says (compile: fast.compile_for_training first; eager: not compiled).",
            "cudagraphs_over": os.environ.get("QLORA_BENCH_CUDAGRAPHS_OVER", "compile")}
    result = {"provenance": {"device": device_name(device), **versions(),
                             "date": time.strftime("%Y-%m-%d", time.gmtime()), "command": command, **meta}}
    old_rows = read_csv(args.csv) if args.csv.is_file() else []

    def save(speed=None):
        if speed is not None:
            result.update({"rows": speed["rows"], "failures": speed["failures"], "round_times_s": speed["round_times"],
                           "round_gpu_ms": speed["round_gpu_ms"], "targets": speed_targets(speed["rows"]),
                           "comparison": compare(speed["rows"])})
            write_csv(merge_rows(old_rows, speed["rows"]), args.csv)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    if not args.no_kernels:
        log(f"NF4 dequantization of a {kernel_shape[0]}x{kernel_shape[1]} weight:")
        try:
            result["kernels"] = kernel_benchmark(device, kernel_shape, dtype, compile=not args.no_compile, log=log,
                                                 copy_bytes=2 * GIB if device.type == "cuda" else 2 ** 20)
        except Exception as exc:
            result["kernel_failure"] = f"{type(exc).__name__}: {exc}"[:800]
            log(f"kernel benchmark FAILED: {result['kernel_failure']}")
        save()
    speed = run_rounds(config, point, setups, device, dtype, rounds=args.rounds, steps=steps, warmup=warmup,
                       r=args.r, alpha=args.alpha, log=log, command=command, on_round_done=save,
                       time_budget_s=args.time_budget)
    save(speed)
    for row in speed["rows"]:
        print(f"{row['mode']:5s} {row['implementation']:9s} {row['compiled']:10s} {row['optimizer']:15s} "
              f"{row['step_s'] * 1000:8.1f} ms +-{row['step_s_spread'] * 1000:6.1f}  gpu {row['gpu_ms_per_step'] or 0:7.1f} ms"
              f"  peak {row['peak_gib'] or 0:7.3f} GiB")
    for t in result["targets"]:
        print(f"target {t['target']}: {t['value']} (limit {t['limit']}) {'ok' if t['ok'] else 'MISS'}")
    return 1 if speed["failures"] or "kernel_failure" in result else 0


def _triton_version():
    from . import nf4_triton

    if not nf4_triton.triton_available():
        return None
    import triton

    return triton.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_tutorial.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny shapes, few steps (any device)")
    parser.add_argument("--config", choices=["tinyllama", "tiny"], default=None)
    parser.add_argument("--shapes", default=None, help="BATCHxSEQ list, default 4x512,8x512,1x2048,4x2048")
    parser.add_argument("--grad-ckpt", choices=["both", "off", "on"], default="both")
    parser.add_argument("--setups", default="all", help="e.g. lora/ours,lora/peft (default: all)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--kernel-shape", default=None, help="OUTxIN of the dequantized weight, default 4096x11008")
    parser.add_argument("--no-kernels", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd dequantization")
    parser.add_argument("--profile", action="store_true", help="profile LoRA/QLoRA ours and PEFT at the first shape")
    parser.add_argument("--speed", action="store_true",
                        help="the interleaved speed runs (--speed-setups at the first shape) instead of the sweep")
    parser.add_argument("--speed-setups", default=DEFAULT_SPEED_SETUPS,
                        help="MODE/IMPL[/COMPILED[/OPTIMIZER]] list, e.g. qlora/ours/cudagraphs,lora/peft/compile")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the speed runs")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds the speed rounds may take")
    parser.add_argument("--csv", type=Path, default=None,
                        help="default: book/data/gpu_benchmark.csv for a full run on a GPU, else _build/bench/")
    parser.add_argument("--json", type=Path, default=None, help="default: next to the CSV, as gpu_kernels.json")
    args = parser.parse_args(argv)

    from .device import pick_device

    runtime = pick_device(args.device)
    device, dtype = runtime.device, runtime.dtype
    # only a full GPU run may replace the book's data; anything else goes to the (ignored) build folder
    book_run = device.type == "cuda" and not args.quick and args.config in (None, "tinyllama")
    out_dir = CSV_PATH.parent if book_run else Path("_build") / "bench"
    if book_run and not (args.csv and args.json) and not out_dir.is_dir():
        parser.error(f"{out_dir}/ is not in {Path.cwd()}: run a full GPU run from the repository's root, "
                     "or say where the results go with --csv and --json")
    args.csv = args.csv or out_dir / CSV_PATH.name
    args.json = args.json or out_dir / KERNELS_PATH.name
    config = bench_config(args.config or ("tiny" if args.quick else "tinyllama"))
    shapes = parse_shapes(args.shapes or ("2x32,1x64" if args.quick else "4x512,8x512,1x2048,4x2048"))
    kernel_shape = parse_shapes(args.kernel_shape or ("64x128" if args.quick else "4096x11008"))[0]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 15)
    ckpt = {"both": [False, True], "off": [False], "on": [True]}[args.grad_ckpt]
    setups = parse_setups(args.setups)
    command = "python -m qlora_tutorial.bench" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    print(f"{runtime}; {sum(1 for _ in shapes) * len(ckpt) * len(setups)} measurements, warmup {warmup}, "
          f"steps {steps}", flush=True)
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    if args.speed:
        return speed_main(args, config, shapes[0], device, dtype, warmup, steps, kernel_shape, command, log)
    profile_setups = list(setups) if args.profile else []
    meta = {"python": sys.version.split()[0], "config": args.config or ("tiny" if args.quick else "tinyllama"),
            "r": args.r, "alpha": args.alpha, "warmup": warmup, "steps": steps,
            "dtype": str(dtype).replace("torch.", ""), "targets": TARGETS}
    result = {}

    def save(suite):  # after every setup, so a run cut short still leaves its numbers
        write_csv(suite["rows"], args.csv)
        result.update({"provenance": {**suite["provenance"], **meta},
                       "comparison": compare(suite["rows"]) if suite["rows"] else [],
                       "rows_extra": suite["extras"], "failures": suite["failures"], "profiles": suite["profiles"]})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")

    suite = run_suite(config, shapes, ckpt, setups, device, dtype, warmup=warmup, steps=steps, r=args.r,
                      alpha=args.alpha, profile_setups=profile_setups, log=log, command=command, on_setup_done=save)
    save(suite)
    log(f"wrote {len(suite['rows'])} rows to {args.csv}")
    if not args.no_kernels:
        log(f"NF4 dequantization of a {kernel_shape[0]}x{kernel_shape[1]} weight:")
        try:
            result["kernels"] = kernel_benchmark(device, kernel_shape, dtype, compile=not args.no_compile, log=log,
                                                 copy_bytes=2 * GIB if device.type == "cuda" else 2 ** 20)
        except Exception as exc:
            suite["failures"].append({"what": "kernel benchmark", "error": f"{type(exc).__name__}: {exc}"[:500]})
            log(f"kernel benchmark FAILED: {type(exc).__name__}: {exc}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"wrote {args.json}")
    for c in result["comparison"]:
        print(f"ours/peft {c['mode']:5s} {c['batch']}x{c['seq']:<5d} ckpt={c['grad_ckpt']!s:5s} "
              f"time {c['time_ratio']:.3f} ({'ok' if c['time_ok'] else 'MISS'})  "
              f"memory {c['memory_ratio']:.3f} ({'ok' if c['memory_ok'] else 'MISS'})")
    return 1 if suite["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

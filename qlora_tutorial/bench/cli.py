"""The command line: ``python -m qlora_tutorial.bench [--quick] [--speed] [--profile] ...``: which runs
to do, with which sizes, and where the CSV and the JSON go."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .. import nf4_triton
from .kernels import kernel_benchmark
from .results import (CSV_PATH, GIB, KERNELS_PATH, compare, merge_rows, provenance, read_csv, shown_command, triton_version,
                      write_csv, write_json)
from .speed import DEFAULT_SPEED_SETUPS, parse_speed_setups, run_rounds, speed_targets
from .step import Point
from .suite import TARGETS, bench_config, parse_setups, parse_shapes, run_suite

DESCRIPTION = "The measured memory and speed suite: ``python -m qlora_tutorial.bench``."


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qlora_tutorial.bench", description=DESCRIPTION)
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
    parser.add_argument("--kernels-only", action="store_true",
                        help="only the NF4 dequantization benchmark, into the 'kernels' entry of --json")
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
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    for option, value, least in (("--warmup", args.warmup, 1), ("--steps", args.steps, 1), ("--r", args.r, 1),
                                 ("--rounds", args.rounds, 1)):
        if value is not None and value < least:
            parser.error(f"{option} must be at least {least}, got {value}: a run with it would measure nothing")
    if not (args.alpha > 0 and math.isfinite(args.alpha)):
        parser.error(f"--alpha must be a positive number, got {args.alpha}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False); leave "
                     "--device out to measure on the CPU")

    from ..device import pick_device

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
    # recorded without its output paths (those of the machine that ran it): what a reader types again
    command = shown_command("python -m qlora_tutorial.bench" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(
        argv if argv is not None else sys.argv[1:])))
    print(f"{runtime}; {sum(1 for _ in shapes) * len(ckpt) * len(setups)} measurements, warmup {warmup}, "
          f"steps {steps}", flush=True)
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    if args.kernels_only:
        return kernels_main(args, device, kernel_shape, dtype, command, log)
    if args.speed:
        return speed_main(args, config, shapes[0], device, dtype, warmup, steps, kernel_shape, command, log)
    return suite_main(args, config, shapes, ckpt, setups, device, dtype, warmup, steps, kernel_shape, command, log)


def suite_main(args, config, shapes, ckpt, setups, device, dtype, warmup, steps, kernel_shape, command, log) -> int:
    """The sweep: every setup at every shape into ``--csv`` (rewritten after every setup), the
    extras, profiles and NF4 kernels into ``--json``; ours/PEFT ratios printed."""
    profile_setups = list(setups) if args.profile else []
    meta = {"python": sys.version.split()[0], "config": args.config or ("tiny" if args.quick else "tinyllama"),
            "r": args.r, "alpha": args.alpha, "warmup": warmup, "steps": steps,
            "dtype": str(dtype).replace("torch.", ""), "targets": TARGETS}
    result = {}

    def save(suite):  # after every setup, so a run cut short still leaves its numbers
        if suite["rows"]:  # a run that measured nothing leaves an earlier run's rows in place
            write_csv(suite["rows"], args.csv)
        result.update({"provenance": {**suite["provenance"], **meta},
                       "comparison": compare(suite["rows"]) if suite["rows"] else [],
                       "rows_extra": suite["extras"], "failures": suite["failures"], "profiles": suite["profiles"]})
        write_json(result, args.json)

    suite = run_suite(config, shapes, ckpt, setups, device, dtype, warmup=warmup, steps=steps, r=args.r,
                      alpha=args.alpha, profile_setups=profile_setups, log=log, command=command, on_setup_done=save)
    save(suite)
    log(f"wrote {len(suite['rows'])} rows to {args.csv}")
    if not args.no_kernels:
        kernels, exc = run_kernels(args, device, kernel_shape, dtype, log)
        if exc is None:
            result["kernels"] = kernels
        else:
            suite["failures"].append({"what": "kernel benchmark", "error": f"{type(exc).__name__}: {exc}"[:500]})
            log(f"kernel benchmark FAILED: {type(exc).__name__}: {exc}")
    write_json(result, args.json)
    log(f"wrote {args.json}")
    for c in result["comparison"]:
        print(f"ours/{c['against']:11s} {c['mode']:5s} {c['batch']}x{c['seq']:<5d} ckpt={c['grad_ckpt']!s:5s} "
              f"time {c['time_ratio']:.3f} ({'ok' if c['time_ok'] else 'MISS'})  "
              f"memory {c['memory_ratio']:.3f} ({'ok' if c['memory_ok'] else 'MISS'})")
    return 1 if suite["failures"] else 0


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
            "dtype": str(dtype).replace("torch.", ""), "targets": TARGETS, "triton": triton_version(),
            "note": "step_s: median over rounds of each round's median wall-clock step (GPU synchronised "
                    "around each step); step_s_spread: largest minus smallest round median; gpu_ms_per_step: "
                    "the profiler's device time per step (kernels and copies, idle gaps excluded), median over "
                    "rounds. peak_gib: torch.cuda.max_memory_allocated over preparation and warm-up, minus what "
                    "was allocated before the setup was built; bitsandbytes' paged optimizers keep their states "
                    "in CUDA managed memory, which PyTorch's allocator does not count. compiled=cudagraphs: the "
                    "whole step recorded with fast.CapturedStep over the model as QLORA_BENCH_CUDAGRAPHS_OVER "
                    "says (compile: fast.compile_for_training first; eager: not compiled).",
            "cudagraphs_over": os.environ.get("QLORA_BENCH_CUDAGRAPHS_OVER", "compile")}
    result = {"provenance": {**provenance(device, command), **meta}}
    old_rows = read_csv(args.csv) if args.csv.is_file() else []

    def save(speed=None):
        if speed is not None:
            result.update({"rows": speed["rows"], "failures": speed["failures"], "round_times_s": speed["round_times"],
                           "round_gpu_ms": speed["round_gpu_ms"], "targets": speed_targets(speed["rows"]),
                           "comparison": compare(speed["rows"])})
            write_csv(merge_rows(old_rows, speed["rows"]), args.csv)
        write_json(result, json_path)

    if not args.no_kernels:
        kernels, exc = run_kernels(args, device, kernel_shape, dtype, log)
        if exc is None:
            result["kernels"] = kernels
        else:
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


def kernels_main(args, device, kernel_shape, dtype, command, log) -> int:
    """``--kernels-only``: the NF4 dequantization benchmark into ``--json``'s ``kernels`` entry (with its own
    provenance, ``kernels_provenance``); the file's other entries stay as they are."""
    result = json.loads(args.json.read_text()) if args.json.is_file() else {}
    kernels, exc = run_kernels(args, device, kernel_shape, dtype, log)
    if exc is not None:
        log(f"kernel benchmark FAILED: {type(exc).__name__}: {exc}")
        return 1
    result["kernels"] = kernels
    result["kernels_provenance"] = {
        **provenance(device, command), "triton": triton_version(),
        "note": "Rows named 'nf4_triton, B bytes x W warps' launch our kernel directly with that tile (packed bytes "
                "per program, warps) and measure the GPU's time; rows named 'custom op' reach the same kernel "
                "through torch.library's Python dispatch, whose cost per call can exceed the kernel's. Default "
                f"tiles: {nf4_triton.DEFAULT_BYTES} bytes x {nf4_triton.DEFAULT_WARPS} warps."}
    write_json(result, args.json)
    log(f"wrote the kernels to {args.json}")
    return 0


def run_kernels(args, device, kernel_shape, dtype, log) -> tuple[dict | None, Exception | None]:
    """The NF4 dequantization benchmark of the command line: its result, or the exception it raised."""
    log(f"NF4 dequantization of a {kernel_shape[0]}x{kernel_shape[1]} weight:")
    try:
        return kernel_benchmark(device, kernel_shape, dtype, compile=not args.no_compile, log=log,
                                copy_bytes=2 * GIB if device.type == "cuda" else 2 ** 20), None
    except Exception as exc:
        return None, exc

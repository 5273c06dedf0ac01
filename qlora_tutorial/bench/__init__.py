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

The modules, in reading order: ``step`` (one training step, its shape, the device helpers),
``results`` (the CSV and JSON, their provenance, the book's copy), ``profiling`` (where a step's time
goes), ``suite`` (the setups and the sweep), ``speed`` (the interleaved rounds), ``kernels`` (the NF4
dequantization benchmark) and ``cli`` (the command line). Beside them: ``unsloth`` (our step against
Unsloth's and PEFT's, each in its own process: ``python -m qlora_tutorial.bench.unsloth``).

Only a full run on a GPU writes into ``book/data/``; anything else goes to ``_build/bench/`` unless
``--csv``/``--json`` say otherwise. Step times are wall-clock (the GPU synchronised around each
step); with LoRA at these sizes the GPU mostly waits for the host, so they vary between runs by
more than the GPU's work does: ``--profile`` records the GPU's busy time per step as well.
"""
from .cli import main, speed_main, suite_main
from .kernels import TRITON_CONFIGS, bytes_check, copy_bandwidth, kernel_benchmark, time_fn, triton_exactness
from .profiling import count_dispatched_ops, gpu_busy_ms, profile_steps, table_totals
from .results import (CSV_COLUMNS, CSV_PATH, GIB, KERNELS_PATH, RAW_DATA_URL, REPOSITORY, ROW_KEY, compare, data_text,
                      device_name, load_benchmark, load_kernels, merge_rows, parse_csv, provenance, read_csv, shown_command,
                      versions, write_csv, write_json)
from .speed import (COMPILED, DEFAULT_SPEED_SETUPS, OPTIMIZERS, Prepared, Setup, make_optimizer, paired_ratio,
                    parse_speed_setups, run_rounds, speed_targets)
from .step import Point, train_step
from .suite import (SETUPS, TARGETS, adapter_dtype, bench_config, build, measure, parse_setups, parse_shapes, run_suite,
                    save_random_model)

__all__ = [
    # step
    "Point", "train_step",
    # results
    "CSV_COLUMNS", "CSV_PATH", "GIB", "KERNELS_PATH", "RAW_DATA_URL", "REPOSITORY", "ROW_KEY", "compare", "data_text",
    "device_name", "load_benchmark", "load_kernels", "merge_rows", "parse_csv", "provenance", "read_csv",
    "shown_command", "versions", "write_csv", "write_json",
    # profiling
    "count_dispatched_ops", "gpu_busy_ms", "profile_steps", "table_totals",
    # suite
    "SETUPS", "TARGETS", "adapter_dtype", "bench_config", "build", "measure", "parse_setups", "parse_shapes", "run_suite",
    "save_random_model",
    # speed
    "COMPILED", "DEFAULT_SPEED_SETUPS", "OPTIMIZERS", "Prepared", "Setup", "make_optimizer", "paired_ratio",
    "parse_speed_setups", "run_rounds", "speed_targets",
    # kernels
    "TRITON_CONFIGS", "bytes_check", "copy_bandwidth", "kernel_benchmark", "time_fn", "triton_exactness",
    # cli
    "main", "speed_main", "suite_main",
]

"""The benchmark suite's helpers and the memory breakdown, on tiny models on the CPU.

The real numbers come from a GPU (``python -m qlora_tutorial.bench``); here we check that what the
suite measures is what it says: same weights and same trainable parameters for ours and PEFT, the
one-shot dequantization equal to the package's and to bitsandbytes', the CSV format, the memory
breakdown against what PyTorch really allocates.
"""
import csv
import json
import math
import weakref
from pathlib import Path

import pytest
import torch

from qlora_tutorial import bench, memory
from qlora_tutorial.lora import lora_param_count
from qlora_tutorial.models import tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return bench.save_random_model(bench.bench_config("tiny"), tmp_path_factory.mktemp("tiny") / "model",
                                   torch.float32, CPU)


def expected_trainable(config, r):
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return config.num_hidden_layers * sum(lora_param_count(a, b, r) for a, b in shapes)


# ---------------------------------------------------------------- arguments
def test_parse_shapes_and_setups():
    assert bench.parse_shapes("4x512, 1X2048") == [(4, 512), (1, 2048)]
    for bad in ("4x", "0x512", "4*512", "ax2"):
        with pytest.raises(ValueError, match="BATCHxSEQ"):
            bench.parse_shapes(bad)
    assert bench.parse_setups("qlora/peft,lora/ours") == [("lora", "ours"), ("qlora", "peft")]
    assert bench.parse_setups("all") == bench.SETUPS
    with pytest.raises(ValueError, match="unknown setup"):
        bench.parse_setups("qlora/hf")
    with pytest.raises(ValueError, match="unknown config"):
        bench.bench_config("llama70b")


# ---------------------------------------------------------------- setups
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_ours_and_peft_train_the_same_parameters(folder, mode):
    config = bench.bench_config("tiny")
    counts = {}
    for impl in ("ours", "peft"):
        model = bench.build(mode, impl, folder, CPU, torch.float32, r=4, alpha=8)
        counts[impl] = sum(p.numel() for p in memory.trainable_parameters(model))
    assert counts["ours"] == counts["peft"] == expected_trainable(config, 4)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_each_setup_says_what_its_lora_matrices_are_stored_in(folder, mode):
    """On a bf16 model: PEFT as it comes keeps them in float32 (autocast_adapter_dtype=True), "peft-nocast"
    in bf16, ours in float32 (computed in bf16); full fine-tuning has none."""
    stored = {impl: bench.adapter_dtype(bench.build(mode, impl, folder, CPU, torch.bfloat16, r=4, alpha=8))
              for impl in ("ours", "peft", "peft-nocast")}
    assert stored == {"ours": "float32", "peft": "float32", "peft-nocast": "bfloat16"}
    assert bench.adapter_dtype(bench.build("full", "torch", folder, CPU, torch.bfloat16)) == ""


def test_all_setups_start_from_the_same_weights(folder):
    """Same weights and LoRA's B = 0: every setup computes the same loss on the first batch."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for mode, impl in bench.SETUPS:
        model = bench.build(mode, impl, folder, CPU, torch.float32, r=4, alpha=8)
        with torch.no_grad():
            losses[(mode, impl)] = model(input_ids=ids, labels=ids).loss.item()
    assert losses[("lora", "ours")] == pytest.approx(losses[("full", "torch")], abs=1e-5)
    assert losses[("lora", "peft")] == pytest.approx(losses[("full", "torch")], abs=1e-5)
    assert losses[("lora", "peft-nocast")] == losses[("lora", "peft")]  # float32 model: the same model
    assert losses[("qlora", "peft-nocast")] == losses[("qlora", "peft")]
    # same NF4 bytes; on CPUs with AVX512-BF16 bitsandbytes' inference path (PEFT's base) rounds the
    # block scales to bf16, which our layer switches off: equal to about 1e-5 relative, not exactly
    assert losses[("qlora", "ours")] == pytest.approx(losses[("qlora", "peft")], rel=1e-4)
    # the 4-bit base is a different (rounded) model: close to, not equal to, the full-precision one
    assert losses[("qlora", "ours")] != losses[("full", "torch")]
    assert losses[("qlora", "ours")] == pytest.approx(losses[("full", "torch")], rel=0.05)


def test_full_fine_tuning_trains_everything(folder):
    model = bench.build("full", "torch", folder, CPU, torch.float32)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_measure_trains_and_frees(folder):
    model = bench.build("qlora", "ours", folder, CPU, torch.float32, r=4, alpha=8)
    before = [p.detach().clone() for p in memory.trainable_parameters(model)]
    m = bench.measure(model, bench.Point(2, 8, grad_ckpt=True), CPU, warmup=1, steps=2)
    assert m["step_s"] > 0 and len(m["step_times"]) == 2
    assert m["tokens_per_s"] == pytest.approx(16 / m["step_s"])
    assert math.isfinite(m["loss"])
    after = memory.trainable_parameters(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "no LoRA parameter changed"
    assert all(p.grad is None for p in after), "gradients were not freed after the measurement"
    assert not model.is_gradient_checkpointing, "checkpointing was left on"
    with pytest.raises(ValueError, match="warm-up"):
        bench.measure(model, bench.Point(1, 8, False), CPU, warmup=0, steps=1)


def test_count_dispatched_ops(folder):
    model = bench.build("lora", "ours", folder, CPU, torch.float32, r=4, alpha=8)
    optimizer = torch.optim.AdamW(memory.trainable_parameters(model))
    counts = bench.count_dispatched_ops(model, optimizer, torch.randint(0, 256, (1, 8)))
    # 2 layers x 7 adapted projections: at least one matmul each way for base, W_a and W_b
    assert counts["aten.mm"] >= 2 * 7 * 3 and sum(counts.values()) > counts["aten.mm"]


# ---------------------------------------------------------------- kernels
def test_kernel_benchmark_on_cpu():
    result = bench.kernel_benchmark(CPU, (64, 128), torch.float32, compile=False, repeat=2, copies=2,
                                    log=lambda *_: None)
    names = [r["implementation"] for r in result["rows"]]
    assert names[0].startswith("bitsandbytes") and len(names) == 3
    assert all(r["equal_to_bitsandbytes"] and r["GBps"] > 0 for r in result["rows"])
    assert result["bytes_moved_per_dequantization"] == 64 * 128 // 2 + 64 * 128 // 64 * 4 + 64 * 128 * 4
    check = result["bytes_check"]
    assert check["ours_cpu_equal_bnb_device_packed"] and check["differing_packed_bytes"] == 0


def test_table_totals_reads_the_profiler_totals():
    table = "...rows...\nSelf CPU time total: 378.543ms\nSelf CUDA time total: 151.344ms\n"
    totals = bench.table_totals(table, steps=3)
    assert totals["cpu_ms_per_step"] == pytest.approx(126.181) and totals["device_ms_per_step"] == pytest.approx(50.448)
    assert bench.table_totals("Self CPU time total: 2.5s\n", 1) == {"cpu_ms_per_step": 2500.0, "device_ms_per_step": None}


# ---------------------------------------------------------------- output
def row(mode, impl, step_s, peak, **kw):
    base = {"mode": mode, "implementation": impl, "compiled": "eager", "optimizer": "adamw", "batch": 4, "seq": 512,
            "grad_ckpt": False, "step_s": step_s, "step_s_spread": "", "gpu_ms_per_step": "",
            "tokens_per_s": 2048 / step_s, "peak_gib": peak, "weights_gib": 1.0, "trainable": 10, "adapter_dtype": "float32",
            "device": "d",
            "torch": "t", "bitsandbytes": "b", "transformers": "tr", "peft": "p", "date": "2026-01-01",
            "command": "python -m qlora_tutorial.bench"}
    return {**base, **kw}


def test_csv_round_trip(tmp_path):
    rows = [row("lora", "ours", 0.1, 5.0), row("lora", "peft", 0.1, "", grad_ckpt=True)]
    path = tmp_path / "b.csv"
    bench.write_csv(rows, path)
    with open(path) as f:
        assert next(csv.reader(f)) == bench.CSV_COLUMNS
    back = bench.read_csv(path)
    assert back[0]["step_s"] == 0.1 and back[0]["batch"] == 4 and back[0]["grad_ckpt"] is False
    assert back[1]["grad_ckpt"] is True and math.isnan(back[1]["peak_gib"])


def test_repository_address_agrees_with_the_book_config():
    import re

    config = (Path(__file__).resolve().parent.parent / "_config.yml").read_text()
    assert re.search(r"^\s*url:\s*(\S+)", config, re.M).group(1) == bench.REPOSITORY
    assert bench.RAW_DATA_URL.startswith("https://raw.githubusercontent.com/") and bench.RAW_DATA_URL.endswith("/book/data")


def test_committed_results_have_provenance():
    rows = bench.load_benchmark()
    # the sweep and the speed runs of the CSV; PEFT with autocast_adapter_dtype=False has its own run
    # (gpu_speed_peft.json, checked in test_gpu_records)
    assert {(r["mode"], r["implementation"]) for r in rows} == {s for s in bench.SETUPS if s[1] != "peft-nocast"}
    for r in rows:
        assert r["device"] and r["torch"] and r["bitsandbytes"] and r["date"]
        assert r["command"].startswith("python -m qlora_tutorial.bench")
        assert r["step_s"] > 0 and r["peak_gib"] > 0
        # weights left empty only where the run could not measure them (gpu_speed.json says why)
        assert r["peak_gib"] > r["weights_gib"] > 0 or (math.isnan(r["weights_gib"]) and r["compiled"] == "cudagraphs")
        assert r["compiled"] in bench.COMPILED and r["optimizer"] in bench.OPTIMIZERS
    speed = [r for r in rows if r["command"].startswith("python -m qlora_tutorial.bench --speed")]
    assert {r["compiled"] for r in speed} == set(bench.COMPILED) and all(r["gpu_ms_per_step"] > 0 for r in speed)
    # several interleaved rounds, so every speed row has a measured spread, and both shapes are there
    assert all(r["step_s_spread"] >= 0 for r in speed)
    assert {(r["batch"], r["seq"]) for r in speed} == {(4, 512), (4, 2048)}
    for name in ("gpu_speed.json", "gpu_speed_4x2048.json"):
        run = json.loads(bench.data_text(name))
        assert run["failures"] == [] and run["provenance"]["rounds"] >= 5
        assert all(len(t) == run["provenance"]["rounds"] for t in run["round_times_s"].values())
    kernels = bench.load_kernels()
    assert kernels["provenance"]["device"] == rows[0]["device"]
    assert kernels["kernels"]["rows"][0]["implementation"].startswith("bitsandbytes")
    with pytest.raises(ValueError, match="not a benchmark CSV"):
        bench.parse_csv("a,b\n1,2\n")


def test_compare_flags_what_misses_the_targets():
    rows = [row("lora", "ours", 0.104, 5.0), row("lora", "peft", 0.100, 5.0),
            row("qlora", "ours", 0.107, 5.2), row("qlora", "peft", 0.100, 5.0), row("full", "torch", 0.05, 9.0)]
    by_mode = {c["mode"]: c for c in bench.compare(rows)}
    assert set(by_mode) == {"lora", "qlora"}
    assert by_mode["lora"]["time_ok"] and by_mode["lora"]["memory_ok"]
    assert not by_mode["qlora"]["time_ok"] and not by_mode["qlora"]["memory_ok"]
    assert by_mode["qlora"]["time_ratio"] == pytest.approx(1.07)


@pytest.mark.slow
def test_main_quick_writes_csv_and_json(tmp_path):
    out_csv, out_json = tmp_path / "b.csv", tmp_path / "k.json"
    code = bench.main(["--quick", "--device", "cpu", "--setups", "qlora/ours", "--shapes", "1x8",
                       "--grad-ckpt", "off", "--steps", "1", "--no-compile", "--kernel-shape", "2x64",
                       "--csv", str(out_csv), "--json", str(out_json)])
    assert code == 0
    rows = bench.read_csv(out_csv)
    assert [(r["mode"], r["implementation"]) for r in rows] == [("qlora", "ours")]
    assert rows[0]["command"].startswith("python -m qlora_tutorial.bench --quick")
    assert rows[0]["device"].startswith("CPU") and rows[0]["torch"] == torch.__version__
    result = json.loads(out_json.read_text())
    assert result["failures"] == [] and result["comparison"] == []  # no PEFT row to compare with
    assert result["rows_extra"][0]["saved_activation_bytes_counted"] > 0
    assert result["kernels"]["bytes_check"]["ours_cpu_equal_bnb_device_packed"]


# ---------------------------------------------------------------- memory breakdown
def test_weight_bytes_of_a_4bit_model(folder):
    model = bench.build("qlora", "ours", folder, CPU, torch.float32, r=4, alpha=8)
    expected = 0
    for name, p in model.named_parameters():
        expected += p.numel() * p.element_size()
        if getattr(p, "quant_state", None) is not None:
            # packed bytes + 16-value code + double-quantized absmax (QLoRA's default): one byte per block of
            # 64, a float32 scale per 256 of those, the 256-value 8-bit code and the float32 offset
            n = p.quant_state.shape.numel()
            assert p.numel() * p.element_size() == n // 2 and p.quant_state.nested
            expected += 16 * 4 + n // 64 + math.ceil(n // 64 / 256) * 4 + 256 * 4 + 4
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.weight_bytes(model) == expected


def test_gradient_and_optimizer_bytes_match_adamw():
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.gradient_bytes(model) == 4 * trainable
    optimizer = torch.optim.AdamW(memory.trainable_parameters(model))
    ids = torch.randint(0, 256, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert states == memory.optimizer_state_bytes(model)
    assert sum(p.grad.numel() * p.grad.element_size() for p in memory.trainable_parameters(model)) == \
        memory.gradient_bytes(model)


def test_saved_activations_grow_with_tokens_and_do_not_leak():
    model = tiny_llama()
    kept = []
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, i, o: kept.append(weakref.ref(o)))
    one = memory.saved_activation_bytes(model, torch.randint(0, 256, (1, 32)))
    two = memory.saved_activation_bytes(model, torch.randint(0, 256, (2, 32)))
    assert one > 0 and two == pytest.approx(2 * one, rel=0.05)
    import gc

    gc.collect()
    assert all(r() is None for r in kept), "counting saved tensors kept the autograd graph alive"
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        memory.saved_activation_bytes(model, torch.randint(0, 256, (1, 8)))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_activation_estimate_matches_a_direct_count(mode):
    """Counted on 1 and 2 layers over 16 and 32 tokens, scaled to 4 layers and 2 x 24 tokens:
    equal to counting the 4-layer model on that batch directly (bf16: LoRA's bf16 copies of W_a and
    W_b are a fixed cost per layer, which the estimate must not scale with the tokens)."""
    from qlora_tutorial.models import build_from_config

    config = bench.bench_config("tiny")
    config.num_hidden_layers = 4
    prepare = memory.prepare_for(mode, r=4, alpha=8, dtype=torch.bfloat16)
    estimate = memory.activation_estimate(config, prepare, batch=2, seq=24, dtype=torch.bfloat16, probe_tokens=16)
    if mode == "lora":
        assert estimate["layer_fixed"] > 0
    model = prepare(build_from_config(config, device="cpu", dtype=torch.bfloat16))
    counted = memory.saved_activation_bytes(model, torch.randint(0, config.vocab_size, (2, 24)))
    assert estimate["activation_bytes"] == pytest.approx(counted, rel=0.01)
    ckpt = memory.activation_estimate(config, prepare, batch=2, seq=24, dtype=torch.bfloat16, probe_tokens=16,
                                      grad_ckpt=True)
    assert ckpt["activation_bytes"] < estimate["activation_bytes"]


def test_predicted_weights_of_a_meta_model_equal_the_real_ones(folder):
    """Planned on the meta device (nothing quantized yet) = counted on the quantized model."""
    from qlora_tutorial.models import build_from_config

    config = bench.bench_config("tiny")
    planned = memory.prepare_for("qlora", r=4, alpha=8, dtype=torch.float32)(
        build_from_config(config, device="meta"))
    real = bench.build("qlora", "ours", folder, CPU, torch.float32, r=4, alpha=8)
    assert memory.weight_bytes(planned) == memory.weight_bytes(real)
    with pytest.raises(ValueError, match="mode"):
        memory.prepare_for("dora")


def test_breakdown_adds_up():
    model = tiny_llama()
    b = memory.breakdown(model, activation_bytes=1000)
    assert b["total"] == b["weights"] + b["gradients"] + b["optimizer_states"] + 1000
    assert b["optimizer_states"] == 2 * b["gradients"]


# ---------------------------------------------------------------- speed runs
def test_parse_speed_setups():
    setups = bench.parse_speed_setups("qlora/ours/cudagraphs, full/torch-amp, qlora/ours/eager/paged_adamw")
    assert setups == [bench.Setup("qlora", "ours", "cudagraphs", "adamw"), bench.Setup("full", "torch-amp"),
                      bench.Setup("qlora", "ours", "eager", "paged_adamw")]
    assert len(bench.parse_speed_setups(bench.DEFAULT_SPEED_SETUPS)) == 18
    for bad, match in (("qlora/hf", "unknown setup"), ("lora/ours/jit", "compiled"), ("lora/ours/eager/sgd", "optimizer"),
                       ("lora/ours/cudagraphs/adamw8bit", "CUDA graphs")):
        with pytest.raises(ValueError, match=match):
            bench.parse_speed_setups(bad)


def test_merge_rows_replaces_what_was_measured_again():
    old = [row("lora", "ours", 0.2, 5.0), row("qlora", "ours", 0.3, 4.0)]
    new = [row("lora", "ours", 0.1, 5.5), row("lora", "ours", 0.05, 6.0, compiled="cudagraphs")]
    merged = bench.merge_rows(old, new)
    assert [(r["mode"], r["compiled"], r["step_s"]) for r in merged] == [
        ("lora", "eager", 0.1), ("qlora", "eager", 0.3), ("lora", "cudagraphs", 0.05)]


def test_speed_targets():
    rows = [row("qlora", "ours", 0.0336, 4.0, compiled="cudagraphs", gpu_ms_per_step=31.0),
            row("lora", "ours", 0.0316, 5.0, compiled="cudagraphs", gpu_ms_per_step=28.6),
            row("qlora", "peft", 0.115, 5.3, compiled="compile"),
            row("qlora", "ours", 0.121, 4.2, compiled="compile", gpu_ms_per_step=31.1)]
    targets = {t["target"]: t for t in bench.speed_targets(rows)}
    assert targets["ours QLoRA cudagraphs step / PEFT QLoRA compile step"]["value"] == pytest.approx(0.0336 / 0.115, abs=1e-4)
    assert targets["ours QLoRA cudagraphs: wall-clock / GPU-busy"]["ok"]  # 33.6 / 31.0 = 1.08
    assert not targets["ours QLoRA / ours LoRA GPU-busy (cudagraphs)"]["ok"]  # 31.0 / 28.6 = 1.084
    assert not targets["qlora compile: ours / PEFT step"]["ok"] and targets["qlora compile: ours / PEFT peak memory"]["ok"]


def test_paired_ratio():
    times = {"a": [1.0, 2.0, 3.0], "b": [2.0, 1.0, 4.0]}
    r = bench.paired_ratio(times, "a", "b")
    assert r == {"median": 0.75, "min": 0.5, "max": 2.0, "faster_rounds": 2, "rounds": 3}
    with pytest.raises(ValueError, match="no round"):
        bench.paired_ratio({"a": [], "b": []}, "a", "b")


def test_kernels_only_keeps_the_rest_of_the_file(tmp_path):
    out_json = tmp_path / "k.json"
    out_json.write_text(json.dumps({"provenance": {"command": "earlier"}, "kernels": {"old": True}}))
    assert bench.main(["--kernels-only", "--device", "cpu", "--kernel-shape", "2x64", "--no-compile",
                       "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["provenance"] == {"command": "earlier"}  # untouched
    assert result["kernels"]["rows"][0]["implementation"].startswith("bitsandbytes")
    assert all(r["equal_to_bitsandbytes"] for r in result["kernels"]["rows"])
    assert result["kernels_provenance"]["command"].startswith("python -m qlora_tutorial.bench --kernels-only")


@pytest.mark.slow
def test_speed_run_on_cpu(tmp_path):
    out_csv, out_json = tmp_path / "b.csv", tmp_path / "s.json"
    bench.write_csv([row("full", "torch", 1.0, 1.0, batch=8)], out_csv)  # an earlier row, kept by the merge
    code = bench.main(["--quick", "--device", "cpu", "--speed", "--speed-setups", "qlora/ours,full/torch-amp",
                       "--shapes", "1x8", "--rounds", "2", "--steps", "1", "--no-kernels",
                       "--csv", str(out_csv), "--json", str(out_json)])
    assert code == 0
    rows = bench.read_csv(out_csv)
    assert [(r["mode"], r["implementation"], r["batch"]) for r in rows] == [
        ("full", "torch", 8), ("qlora", "ours", 1), ("full", "torch-amp", 1)]
    assert all(r["step_s"] > 0 and r["step_s_spread"] >= 0 for r in rows[1:])
    result = json.loads(out_json.read_text())
    assert result["failures"] == [] and all(len(t) == 2 for t in result["round_times_s"].values())


@pytest.mark.slow
def test_the_unsloth_bench_runs_our_setups_and_peft_on_a_cpu(tmp_path, monkeypatch):
    """Every setup of our process and PEFT's of bench.unsloth, on a small Llama on the CPU: the eager
    ones (with compiled layers or not) train and give rows; the recorded ones need CUDA and are
    recorded as failures, with the reason."""
    from qlora_tutorial.bench import unsloth

    monkeypatch.setattr(unsloth, "DEVICE", torch.device("cpu"))
    folder = unsloth.save_model("tiny", tmp_path / "tiny")
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()
    out = []
    unsloth.child_ours(folder, "tiny", unsloth.SHAPES["tiny"], [False, True], rounds=2, steps=1, warmup=1, emit=out.append)
    first = len(unsloth.CHUNK_MIBS)  # the chunked loss alone comes first, a row per chunk size
    losses, out = [r["loss_chunk"] for r in out[:first]], out[first:]
    assert [r["chunk_mib"] for r in losses] == list(unsloth.CHUNK_MIBS)
    reference = losses[0]["loss"]  # transformers' loss
    assert all(abs(r["loss"] - reference) <= 1e-2 * abs(reference) for r in losses)  # bf16 logits
    unsloth.child_peft(folder, "tiny", unsloth.SHAPES["tiny"], [False, True], rounds=2, steps=1, warmup=1, emit=out.append)
    rows = {(r["grad_ckpt"], r["implementation"], tuple(r["fusions"])) for r in out if "failure" not in r}
    assert rows == {(False, "ours", ()), (False, "ours", ("chunked_loss",)), (True, "ours", ()),
                    (True, "ours", ("chunked_loss",)), (True, "ours", unsloth.OFFLOADED),
                    (False, "ours", ("chunked_loss", "swiglu")), (True, "ours", ("chunked_loss", "swiglu")),
                    (True, "ours", unsloth.SWIGLU_OFFLOADED),
                    (True, "ours", unsloth.COMPILED_OFFLOADED), (False, "peft", ()), (True, "peft", ())}
    failures = [r for r in out if "failure" in r]
    # 5 recorded setups (graph, graph + chunked loss, with and without checkpointing; + budget without) x 2 rounds
    assert len(failures) == 2 * 5 and all("needs a CUDA GPU" in f["error"] for f in failures)
    assert sum(unsloth.BUDGETED[-1] in f["failure"] for f in failures) == 2
    assert all(len(r["wall_ms_rounds"]) == 2 and r["peak_gib"] is None for r in out if "failure" not in r)
    only = []  # --setups: only the setups named
    unsloth.child_ours(folder, "tiny", [(1, 8)], [True], rounds=1, steps=1, warmup=1, emit=only.append,
                       only={unsloth.label(unsloth.OFFLOADED)}, loss_chunks=False)
    assert [(r["shape"], r["grad_ckpt"], r["implementation"], tuple(r["fusions"])) for r in only] == \
        [("1x8", True, "ours", unsloth.OFFLOADED)]


def test_a_peak_trace_finds_the_highest_point_and_what_was_alive():
    """bench.unsloth.peak_of on an allocator history: the live bytes' highest point, the allocation that
    reached it, and what was alive then, by the code that allocated it (a library's frame before the
    bench's own)."""
    from qlora_tutorial.bench import unsloth

    def frames(*where):
        return [{"filename": f"/x/site-packages/{f}", "line": line, "name": name} for f, line, name in where]
    bench = ("qlora_tutorial/bench/step.py", 9, "train_step")
    mlp = frames(("transformers/models/llama/modeling_llama.py", 5, "forward"), bench)
    step = [{"filename": "/w/qlora_tutorial/bench/step.py", "line": 9, "name": "train_step"}]
    zoo = [{"filename": "/root/us/unsloth_zoo/losses.py", "line": 3, "name": "loss"}]  # a folder on PYTHONPATH
    trace = [{"action": "alloc", "addr": 1, "size": 2**20, "frames": mlp},
             {"action": "segment_alloc", "addr": 0, "size": 2**30, "frames": []},  # not an allocation of a tensor
             {"action": "alloc", "addr": 2, "size": 3 * 2**20, "frames": step},
             {"action": "free_requested", "addr": 1, "size": 2**20, "frames": mlp},
             {"action": "alloc", "addr": 3, "size": 2**20, "frames": mlp},
             {"action": "free_completed", "addr": 1, "size": 2**20, "frames": mlp},
             {"action": "alloc", "addr": 4, "size": 2**19, "frames": frames(("torch/optim/adamw.py", 7, "step"))},
             {"action": "free_completed", "addr": 2, "size": 3 * 2**20, "frames": step},
             {"action": "alloc", "addr": 5, "size": 2**20, "frames": zoo}]
    got = unsloth.peak_of(trace)
    assert got["peak_gib"] == round(5 * 2**20 / 2**30, 4) and got["events"] == len(trace)
    assert got["at"] == {"where": "transformers/models/llama/modeling_llama.py:5 forward", "mib": 1.0}
    assert got["live"] == [{"where": "qlora_tutorial/bench/step.py:9 train_step", "mib": 3.0, "tensors": 1},
                           {"where": "transformers/models/llama/modeling_llama.py:5 forward", "mib": 2.0, "tensors": 2}]
    trace.append({"action": "alloc", "addr": 6, "size": 5 * 2**20, "frames": zoo})
    assert unsloth.peak_of(trace)["at"]["where"] == "unsloth_zoo/losses.py:3 loss"


def test_the_unsloth_bench_imports_no_transformers_before_unsloth():
    """Unsloth must be imported before transformers: its process imports this module first."""
    import subprocess
    import sys

    code = "import sys, qlora_tutorial.bench.unsloth; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_unsloth_targets_take_our_smallest_step_with_checkpointing():
    from qlora_tutorial.bench import unsloth

    def row(ckpt, impl, fusions, wall, gpu, peak):
        return {"model": "m", "shape": "1x8", "grad_ckpt": ckpt, "implementation": impl, "fusions": list(fusions),
                "wall_ms": wall, "gpu_ms": gpu, "peak_gib": peak}

    result = {"rows": [row(True, "unsloth", (), 100, 50, 2.0), row(True, "ours", unsloth.RECORDED, 42, 40, 3.0),
                       row(True, "ours", unsloth.OFFLOADED, 90, 60, 1.9)]}
    got = {t["target"].split(": ")[1]: (t["value"], t["ok"]) for t in unsloth.unsloth_targets(result)}
    assert got == {"GPU-busy, ours / Unsloth": (0.8, True), "peak memory, ours / Unsloth": (0.95, True),
                   "our wall-clock / our GPU-busy": (1.05, True)}
    result["rows"][1]["gpu_ms"] = 45  # 0.9 of Unsloth's: a miss
    assert [t["ok"] for t in unsloth.unsloth_targets(result)] == [False, True, True]
    result["rows"].append(row(True, "ours", unsloth.BUDGETED, 43, 41, 1.6))  # smaller still: its peak counts
    assert unsloth.unsloth_targets(result)[1]["value"] == 0.8
    model, shape, limit = unsloth.MOONSHOT  # the 8B at 1x8192: our smallest step with checkpointing, Unsloth or not
    result["rows"] += [dict(row(True, "ours", f, 900, 800, peak), model=model, shape=shape)
                       for f, peak in ((unsloth.RECORDED, limit + 3), (unsloth.COMPILED_OFFLOADED, limit - 1))]
    moonshot = unsloth.unsloth_targets(result)[-1]
    assert (moonshot["value"], moonshot["ok"]) == (limit - 1, True) and shape in moonshot["target"]
    result["rows"][-1]["peak_gib"] = limit
    assert not unsloth.unsloth_targets(result)[-1]["ok"]


def test_kernels_are_told_apart_by_their_names():
    """The GPU-busy time by kind of kernel reads the kernels' names as the profiler gives them on an H100."""
    from qlora_tutorial.bench.profiling import KERNEL_KINDS, kernel_kind

    names = {
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": "matmul",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": "attention",
        "nf4_dequantize_kernel": "dequantize",
        "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, int)": "dequantize",
        "Memcpy DtoH (Device -> Pinned)": "copy",
        "Memset (Device)": "copy",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "triton_poi_fused__to_copy_mul_silu_0": "other",
        "_rms_layernorm_forward": "other",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
    }
    assert {name: kernel_kind(name) for name in names} == names
    assert {kind for kind, _ in KERNEL_KINDS} | {"other"} == set(names.values())

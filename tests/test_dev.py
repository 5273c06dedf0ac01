"""The notebook executor's normalisation, and the chapter list it runs."""
from tools import dev


def test_normalise_strips_timestamps_and_paths():
    home = str(dev.Path.home())
    nb = {"metadata": {"kernelspec": {"name": "x"}, "widgets": {}},
          "cells": [{"cell_type": "code", "metadata": {"execution": {"iopub.execute_input": "2026"}},
                     "outputs": [{"output_type": "stream", "name": "stdout",
                                  "text": f"{dev.ROOT}/book/x.py and {home}/.cache/m\n"}]}]}
    out = dev.normalise(nb)
    assert out["metadata"]["kernelspec"]["name"] == "python3" and "widgets" not in out["metadata"]
    assert "execution" not in out["cells"][0]["metadata"]
    assert out["cells"][0]["outputs"][0]["text"] == "book/x.py and ~/.cache/m\n"


def test_chapters_follow_the_toc():
    toc = (dev.ROOT / "_toc.yml").read_text()
    chapters = dev.chapters()
    assert chapters, "no chapter notebooks found from _toc.yml"
    positions = [toc.index(f"file: {p.relative_to(dev.ROOT).with_suffix('')}") for p in chapters]
    assert positions == sorted(positions)


def test_portability_matrix_covers_the_cpus_readers_have():
    """The matrix the maintainers run: native, AVX2-only and generic kernels, 1 and 4 threads."""
    envs = list(dev.PORTABILITY.values())
    assert {} in envs
    assert {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"} in envs
    assert {"ATEN_CPU_CAPABILITY": "default"} in envs
    threads = sorted(int(e["OMP_NUM_THREADS"]) for e in envs if "OMP_NUM_THREADS" in e)
    assert threads == [1, 4] and all(e["MKL_NUM_THREADS"] == e["OMP_NUM_THREADS"] for e in envs if "OMP_NUM_THREADS" in e)


def test_nbval_command_is_plain_pytest_nbval():
    """The test command runs what a reader's CI runs: `pytest --nbval` and the chapters, nothing more
    (conftest.py supplies the sanitize rules, the stderr policy and the environment)."""
    cmd = [str(c) for c in dev.nbval_command()]
    assert cmd[1:3] == ["-m", "pytest"] and "--nbval" in cmd
    assert not [c for c in cmd if c.startswith("--nbval-")]  # no sanitize file, no kernel flags
    assert [cmd[i + 1] for i, c in enumerate(cmd) if c == "-p"] == ["no:cacheprovider"]  # no extra plugin
    assert [c for c in cmd if c.endswith(".ipynb")] == [str(p.relative_to(dev.ROOT)) for p in dev.chapters()]

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

"""The committed notebooks are the book: check that they were executed top to bottom.

nbval passes a cell that was never executed without comparing anything, so a chapter committed
half-run would look green. These checks close that hole.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOC = (ROOT / "_toc.yml").read_text()
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
REPO_URL = re.search(r"^\s*url:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M).group(1)


def code_cells(path):
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def test_there_are_chapters():
    assert NOTEBOOKS, "book/ holds no notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_in_order(path):
    counts = [c.get("execution_count") for c in code_cells(path)]
    assert None not in counts, f"{path.name}: {counts.count(None)} code cell(s) never executed"
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(counts)}; "
        "re-run it with `python3 tools/dev.py execute book/{path.name}`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_errors_in_outputs(path):
    for cell in code_cells(path):
        tags = cell.get("metadata", {}).get("tags", [])
        errors = [o for o in cell.get("outputs", []) if o["output_type"] == "error"]
        if "raises-exception" not in tags:
            assert not errors, f"{path.name}: a cell raised {errors[0]['ename']}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_in_toc(path):
    assert f"file: book/{path.stem}" in TOC, f"{path.name} is not in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_cell_first(path):
    first = "".join(code_cells(path)[0]["source"])
    assert "google.colab" in first and REPO_URL in first, (
        f"{path.name}: the first code cell must install the package on Colab only, from {REPO_URL}")
    assert not re.search(r"pip[^\n]*install[^\n]*\btorch\b", first), f"{path.name}: never reinstall torch on Colab"
    tags = code_cells(path)[0].get("metadata", {}).get("tags", [])
    assert "remove-cell" in tags, f"{path.name}: the Colab install cell runs on Colab but is not shown on the site (tag remove-cell)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_machine_paths(path):
    text = path.read_text()
    for needle in ("/work/", "/root/", "/home/"):
        assert needle not in text, f"{path.name} contains the machine path {needle!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ignored_outputs_are_asserted(path):
    """A cell whose output nbval does not compare (timings, training on another CPU) must still check
    what it computed, or a wrong result there would pass unseen."""
    for cell in code_cells(path):
        source = "".join(cell["source"])
        if source.lstrip().startswith("# NBVAL_IGNORE_OUTPUT"):
            assert re.search(r"^\s*assert\b", source, re.M), (
                f"{path.name}: an NBVAL_IGNORE_OUTPUT cell asserts nothing:\n{source[:300]}")


def test_file_numbers_are_the_site_numbers():
    """The site numbers chapters 1, 2, ... across the numbered parts of _toc.yml; each chapter's file
    name starts with the same number, so "chapter 9" and book/09_adapters.ipynb are one thing."""
    chapters = re.findall(r"file:\s*book/(\d\d)_\S+", TOC)
    assert chapters, "no numbered chapter files in _toc.yml"
    assert [int(n) for n in chapters] == list(range(1, len(chapters) + 1)), chapters

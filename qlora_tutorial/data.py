"""Data the book trains and evaluates on: the original README's quotes, offline by default.

The original README fine-tunes on the hub dataset ``Abirate/english_quotes`` (columns ``quote``, ``author``,
``tags``). No machine of this project can reach the hub, so the default here is a small dataset with
the same columns that ships inside the package: 77 short, well-known quotations written out for this
book (mostly by authors long in the public domain), each with its popular attribution (some of
these attributions are disputed, just as in the hub dataset) and a few topic tags. On Colab,
``load_quotes(source="hub")`` gives the real hub dataset.
"""
from __future__ import annotations

import json
from importlib import resources

HUB_QUOTES = "Abirate/english_quotes"
COLUMNS = ("quote", "author", "tags")


def shipped_quotes() -> list[dict]:
    """The quotes shipped with the package, as a list of {"quote", "author", "tags"} rows."""
    text = resources.files("qlora_tutorial").joinpath("data_files/quotes.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_quotes(source: str = "shipped"):
    """The quotes as a ``datasets.Dataset`` with columns quote, author, tags.

    source="shipped" (default, works offline) or "hub" (the original README's ``Abirate/english_quotes``
    train split; needs hub access, e.g. on Colab).
    """
    import datasets

    if source == "shipped":
        return datasets.Dataset.from_list(shipped_quotes())
    if source == "hub":
        return datasets.load_dataset(HUB_QUOTES, split="train")
    raise ValueError(f"unknown source {source!r}: use 'shipped' (offline, in the package) or 'hub' ({HUB_QUOTES})")

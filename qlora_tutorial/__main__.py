"""``python -m qlora_tutorial doctor``: versions, device, and whether 4-bit works, for bug reports."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["doctor"]:
        print("usage: python -m qlora_tutorial doctor", file=sys.stderr)
        return 2
    from .doctor import report

    ok = report()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""What the file generators in scripts/ share: write the generated text, or,
with --check, compare it with the committed file and show the difference.
Standard library only."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


class Refused(Exception):
    """The source holds something the generator has no translation for."""


def run(script: str, doc: str, output: str, generate: Callable[[], str]) -> int:
    """The main of a generator that writes ROOT/`output` as `generate()`
    makes it: 0 when written (or, with --check, current), 1 with a diff
    when --check finds it stale, 2 when the generator refuses."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1, with a diff, if {output} is not what would be written"
    )
    args = parser.parse_args()
    try:
        text = generate()
    except Refused as e:
        print(f"{script}: {e}", file=sys.stderr)
        return 2
    out = ROOT / output
    if not args.check:
        out.write_text(text, encoding="utf-8")
        return 0
    current = out.read_text(encoding="utf-8") if out.exists() else ""
    if current == text:
        return 0
    diff = difflib.unified_diff(
        current.splitlines(keepends=True),
        text.splitlines(keepends=True),
        f"{output} (as it is)",
        f"{output} (as generated)",
    )
    sys.stdout.writelines(diff)
    print(f"{output} is stale: run python3 scripts/{script}", file=sys.stderr)
    return 1

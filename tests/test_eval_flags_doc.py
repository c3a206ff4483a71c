"""docs/vllm.md's table of `speculators eval` flags against the real parser: every flag is
listed, and every literal default is the one argparse has (eval's flags live only in argparse)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "vllm.md"
HEADING = "### `speculators eval` flags and defaults"


def _eval_parser() -> argparse.ArgumentParser:
    from speculators.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["eval"]


def _rows() -> dict[str, str]:
    """flag -> its default cell, from the table under HEADING."""
    text = DOC.read_text()
    assert HEADING in text, f"{DOC} lost the section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`-"):
            for flag in re.findall(r"`(-[-\w]+)", cells[0]):
                rows[flag] = cells[1]
    return rows


def test_every_eval_flag_is_documented_with_its_default():
    rows = _rows()
    checked = 0
    for action in _eval_parser()._actions:
        if not action.option_strings or action.option_strings == ["-h", "--help"]:
            continue
        for flag in action.option_strings:
            assert flag in rows, f"`speculators eval {flag}` is not in the flag table of {DOC.name}"
            cell = rows[flag]
            assert cell, f"{flag}: the default cell is empty"
            default = action.default
            if isinstance(default, bool):
                assert ("on" if default else "off") in cell, (flag, default, cell)
            elif default is not None:
                assert f"`{default}`" in cell, f"{flag}: argparse's default is {default!r}, the doc says {cell!r}"
            checked += 1
    assert checked >= 30
    # and nothing documented that the parser does not take
    known = {f for a in _eval_parser()._actions for f in a.option_strings}
    assert sorted(set(rows) - known) == []

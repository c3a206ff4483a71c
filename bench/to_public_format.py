"""Convert our hidden-state data to the layout the public `speculators` 0.9.0 trainer reads.

A thin wrapper kept for the bench scripts: the converter itself is the product's
`speculators convert-data --to public` (speculators/data/public_convert.py).

    python bench/to_public_format.py OUR_DATA_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path


def convert(src: str | Path, dst: str | Path) -> Path:
    from speculators.data.public_convert import convert_to_public

    convert_to_public(src, dst, on_corrupt="raise")
    return Path(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    a = ap.parse_args()
    print(convert(a.src, a.dst))


if __name__ == "__main__":
    main()

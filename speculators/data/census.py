"""How many usable conversations a source can give, before anything is tokenized.

The dashboard checks a run's sample count against this at submit time, so a run asking
for more conversations than its dataset holds is refused with the real figure instead of
preparing everything and dropping most of it in a log. "Usable" applies the checks
prepare-data makes before tokenizing (the record reads as a chat with an assistant turn
after the first prompt); conversations that lose every assistant token to truncation are
only known after tokenizing and are reported by the prepare stage.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from speculators.data.prepare import drop_opening_assistant
from speculators.data.sources import BadConversation, iter_records, normalize_record, resolve_data


@dataclass
class Census:
    records: int = 0  # records read
    usable: int = 0  # of those, usable chats
    complete: bool = False  # the whole source was read (else counting stopped at `need`)
    dropped: Counter = field(default_factory=Counter)  # reason -> records


def count_usable(data: str, need: int | None = None) -> Census | None:
    """Count the usable conversations of `data` (a prepare-data source), stopping once `need`
    are found. None for a hub dataset (counting it would download it)."""
    spec = resolve_data(data)
    if spec.kind == "hub":
        return None
    out = Census()
    for record in iter_records(spec):
        out.records += 1
        try:
            drop_opening_assistant(normalize_record(record))
            out.usable += 1
        except BadConversation as exc:
            out.dropped[str(exc)] += 1
        if need is not None and out.usable >= need:
            return out
    out.complete = True
    return out

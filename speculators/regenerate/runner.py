"""`speculators regenerate`: rewrite the assistant turns of conversations with the verifier.

A draft must predict what the verifier says, not what a human wrote; training on
the verifier's own replies closes that gap. Each assistant turn is regenerated
given the *regenerated* history (user and system turns are kept verbatim), so a
multi-turn record reads as one the verifier could have produced.

Output: one JSON object per line, ``{"id", "conversations": [{"role", "content"}],
"regenerated": {...}}``, which `prepare-data --data OUT.jsonl` takes unchanged.
The file is append-only: a rerun after a crash skips the ids already written
(a torn last line is cut off first). Records are chosen like prepare-data chooses
them (source order shuffled by ``--seed``, first ``--max-samples`` usable), so
``eval --skip-samples N --data-seed S`` holds out the right prompts.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from speculators.config.regenerate import RegenConfig
from speculators.data.sources import BadConversation, normalize_record, resolve_data
from speculators.errors import UserError
from speculators.progress import Progress

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class Reply:
    text: str
    tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class RegenSummary:
    output: str
    written: int = 0
    resumed: int = 0  # records already in the output before this run
    skipped: dict[str, int] = field(default_factory=dict)
    turns: int = 0
    tokens: int = 0
    cut_at_length: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


class Backend(Protocol):
    """Generates one reply per prompt; prompts of one call may run concurrently."""

    name: str

    def prompt_tokens(self, messages: Messages) -> int | None: ...

    def context_limit(self) -> int | None: ...

    def generate(self, prompts: Sequence[Messages], max_tokens: int, temperature: float,
                 seed: int, heartbeat: Callable[[str], None] | None = None) -> list[Reply | Exception]: ...


class SkipRecord(Exception):
    """This record cannot be regenerated (reason in the message); it is counted and skipped."""


# -- choosing records -----------------------------------------------------------------

def select_records(sources: Sequence[str], seed: int, max_samples: int | None,
                   skipped: Counter) -> Iterator[tuple[str, Messages]]:
    """(id, messages) for each usable record: every source's records in prepare-data's
    shuffled order, concatenated, stopping after ``max_samples`` usable ones."""
    from speculators.data.prepare import ordered_records

    if not sources:
        raise UserError("regenerate needs at least one --data SOURCE")
    specs = [resolve_data(s) for s in sources]
    kept = 0
    for spec in specs:
        for index, raw in enumerate(ordered_records(spec, seed)):
            if max_samples is not None and kept >= max_samples:
                return
            try:
                messages = normalize_record(raw)
            except BadConversation as exc:
                skipped[str(exc)] += 1
                continue
            while messages and messages[0]["role"] == "assistant":
                messages = messages[1:]
            if not any(m["role"] == "assistant" for m in messages):
                skipped["no assistant turn after a user turn"] += 1
                continue
            rid = raw.get("id") if isinstance(raw, dict) else None
            yield f"{spec.name}:{index}:{rid}" if rid is not None else f"{spec.name}:{index}", messages
            kept += 1


# -- the append-only output -----------------------------------------------------------

def load_done(path: Path, meta: dict[str, Any] | None = None) -> set[str]:
    """Ids already written; a torn final line (crash mid-write) is cut off. With ``meta``, every
    record must have been written with those settings (a resume must not mix two runs)."""
    if not path.exists():
        return set()
    if not path.is_file():
        raise UserError(f"--output {path} exists and is not a file")
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    if cut < len(raw):
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(raw) - cut)
        with open(path, "r+b") as f:
            f.truncate(cut)
    done = set()
    for lineno, line in enumerate(raw[:cut].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(
                f"--output {path}: line {lineno} is not JSON; it was not written by regenerate. "
                "Choose a new --output file"
            ) from None
        if not isinstance(rec, dict) or "id" not in rec or "conversations" not in rec:
            raise UserError(
                f"--output {path}: line {lineno} lacks 'id'/'conversations'; it was not written by "
                "regenerate. Choose a new --output file"
            )
        if meta is not None and rec.get("regenerated") != meta:
            raise UserError(
                f"--output {path}: line {lineno} was regenerated with other settings "
                f"({rec.get('regenerated')}, now {meta}); resuming would mix them. Use a new --output "
                "or delete this file"
            )
        done.add(str(rec["id"]))
    return done


# -- regenerating ------------------------------------------------------------------------

@dataclass
class _Conversation:
    rid: str
    source: Messages
    out: Messages = field(default_factory=list)
    pos: int = 0  # next index into source
    turns: int = 0
    tokens: int = 0
    cut: int = 0
    done: bool = False
    error: str | None = None

    def next_prompt(self, max_turns: int | None) -> Messages | None:
        """Copy user/system turns up to the next assistant turn; the prompt, or None when finished."""
        while self.pos < len(self.source):
            m = self.source[self.pos]
            if m["role"] != "assistant":
                self.out.append(dict(m))
                self.pos += 1
                continue
            if max_turns is not None and self.turns >= max_turns:
                break
            return list(self.out)
        # Drop trailing non-assistant turns: nothing answers them.
        while self.out and self.out[-1]["role"] != "assistant":
            self.out.pop()
        self.done = True
        return None


def _misfit(backend: Backend, prompt: Messages, cfg: RegenConfig) -> str | None:
    """Why ``prompt`` cannot be answered (None when it can)."""
    limit = backend.context_limit()
    if limit is None and cfg.max_prompt_tokens is None:
        return None
    n = backend.prompt_tokens(prompt)
    if n is None:
        return None
    if cfg.max_prompt_tokens is not None and n > cfg.max_prompt_tokens:
        return "prompt longer than --max-prompt-tokens"
    if limit is not None and n + cfg.max_tokens > limit:
        return "prompt does not fit the model's context with --max-tokens"
    return None


def regenerate_chunk(backend: Backend, chunk: list[tuple[str, Messages]], cfg: RegenConfig,
                     chunk_seed: int, heartbeat: Callable[[str], None] | None = None) -> list[_Conversation]:
    """Regenerate a chunk of conversations turn by turn, each turn's prompts in one backend call."""
    convs = [_Conversation(rid, messages) for rid, messages in chunk]
    step = 0
    while True:
        pending: list[tuple[_Conversation, Messages]] = []
        for c in convs:
            if c.done:
                continue
            prompt = c.next_prompt(cfg.max_turns)
            if prompt is None:
                continue
            why = _misfit(backend, prompt, cfg)
            if why is not None:
                # Keep what was regenerated so far; the rest of the conversation is dropped.
                c.pos = len(c.source)
                c.next_prompt(cfg.max_turns)
                if c.turns == 0:
                    c.error = why
                continue
            pending.append((c, prompt))
        if not pending:
            return convs
        replies = backend.generate([p for _, p in pending], cfg.max_tokens, cfg.temperature,
                                   chunk_seed * 1000 + step, heartbeat)
        step += 1
        for (c, _), reply in zip(pending, replies):
            if isinstance(reply, Exception):
                c.error = f"generation failed: {type(reply).__name__}: {str(reply)[:200]}"
                c.done = True
                continue
            c.out.append({"role": "assistant", "content": reply.text})
            c.pos += 1
            c.turns += 1
            c.tokens += reply.tokens
            c.cut += int(reply.finish_reason == "length")


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def regenerate(cfg: RegenConfig, backend: Backend, progress: Callable[[str], None] | None = None,
               total_hint: int | None = None) -> RegenSummary:
    """Regenerate the selected records into ``cfg.output``, resuming past records already there."""
    say = progress or logger.info
    # types and bounds were checked when `cfg` was built (speculators.config.regenerate)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": cfg.model, "backend": backend.name, "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens, "max_turns": cfg.max_turns, "seed": cfg.seed}
    done = load_done(out, meta)
    summary = RegenSummary(output=str(out), resumed=len(done))
    skipped: Counter = Counter()
    total = total_hint or cfg.max_samples
    start = time.time()
    last_say = 0.0
    processed = 0

    def chunks() -> Iterator[list[tuple[str, Messages]]]:
        nonlocal processed
        chunk: list[tuple[str, Messages]] = []
        for rid, messages in select_records(cfg.data, cfg.seed, cfg.max_samples, skipped):
            if rid in done:
                processed += 1
                continue
            chunk.append((rid, messages))
            if len(chunk) == cfg.concurrency:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def heartbeat(what: str) -> None:
        nonlocal last_say
        now = time.time()
        if now - last_say >= 2.0:
            last_say = now
            say(f"regenerate: {processed} records done, {summary.tokens} tokens; {what} "
                f"({now - start:.0f}s elapsed)")

    if done:
        say(f"regenerate: resuming {out}: {len(done)} records already written are skipped")
    bar = Progress()  # the dashboard's stage bar (the log lines below are for people)
    with open(out, "a", encoding="utf-8") as f:
        for n, chunk in enumerate(chunks()):
            bar.update(processed, total)
            for c in regenerate_chunk(backend, chunk, cfg, cfg.seed * 1_000_003 + n, heartbeat):
                processed += 1
                if c.error or c.turns == 0:
                    skipped[c.error or "no assistant turn regenerated"] += 1
                    continue
                line = json.dumps({"id": c.rid, "conversations": c.out, "regenerated": meta},
                                  ensure_ascii=False)
                f.write(line + "\n")
                summary.written += 1
                summary.turns += c.turns
                summary.tokens += c.tokens
                summary.cut_at_length += c.cut
            f.flush()
            bar.update(processed, total)
            now = time.time()
            if now - last_say >= 2.0:
                last_say = now
                rate = summary.tokens / max(now - start, 1e-9)
                if total:
                    frac = min(1.0, processed / total)
                    todo = max(0, total - processed)
                    per = (now - start) / max(1, processed - len(done)) if processed > len(done) else 0
                    ticks = "#" * int(frac * 20)
                    say(f"regenerate: [{ticks:<20}] {processed}/{total} records, {summary.tokens} tokens "
                        f"({rate:.1f} tok/s), ETA {_fmt_eta(per * todo)}")
                else:
                    say(f"regenerate: {processed} records, {summary.tokens} tokens ({rate:.1f} tok/s)")
    if total:  # every record is written or skipped: the bar ends full (skipped ones never reach a chunk)
        bar.update(total, total)
    summary.seconds = time.time() - start
    summary.skipped = dict(skipped)
    return summary


def format_summary(s: RegenSummary) -> str:
    skipped = sum(s.skipped.values())
    lines = [
        f"regenerate: {s.written} records written ({s.turns} assistant turns, {s.tokens} tokens) in "
        f"{s.seconds:.1f}s = {s.tokens_per_s:.1f} tokens/s -> {s.output}",
    ]
    if s.resumed:
        lines.append(f"  {s.resumed} records were already there (resumed)")
    if s.cut_at_length:
        lines.append(f"  {s.cut_at_length} replies stopped at --max-tokens")
    if skipped:
        lines.append(f"  skipped {skipped} records: " + "; ".join(f"{k} ({v})" for k, v in sorted(s.skipped.items())))
    return "\n".join(lines)

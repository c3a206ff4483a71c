"""datagen's input: a prepared directory as it is, or a conversation source prepared first.

`speculators datagen --train-data-path` takes what `prepare-data --data` takes (``sharegpt``,
``ultrachat``, a ``.jsonl``, a hub id, repeatable). Such a source is prepared by prepare-data's
own code (`speculators.data.prepare.prepare_data`) into ``--cache-dir/prepared-<fingerprint>``,
the fingerprint being prepare-data's (tokenizer, chat template, sources, ``--seq-length``,
``--max-samples``, ``--seed``): a rerun with the same inputs finds that copy and tokenizes
nothing. A prepare-data output directory is used as it is.

It also writes the token frequencies of the rows datagen uses: ``OUT/token_freq.pt`` beside
``data_config.json`` and, as the public scripts do, ``--token-freq-path`` (default
``./token_freq.pt``), never overwriting a file there that holds other counts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speculators.atomic import atomic_write_bytes
from speculators.config.datagen import DatagenConfig
from speculators.config.prepare import PrepareConfig
from speculators.data.prepare import PREPARE_CONFIG, TOKEN_FREQ, prepare_data, prepare_fingerprint, token_frequencies
from speculators.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LENGTH = 2048  # the public data_generation_offline.py's default
CHAT_TEMPLATE_NOTE = "Uses tokenizer's built-in chat template"


@dataclass
class PreparedInput:
    path: Path  # the prepared dataset datagen reads
    sources: list[str]  # --train-data-path as given
    prepared_here: bool  # datagen prepared it (or found its cached copy)
    cached: bool  # the cached copy was reused: nothing tokenized
    cache_dir: Path | None
    params: dict[str, Any]  # prepare-data's parameters (seq_length, seed, max_samples, ...)


def default_cache_dir() -> Path:
    root = os.environ.get("SPECULATORS_CACHE") or Path.home() / ".cache" / "speculators"
    return Path(root) / "prepared"


def is_prepared_dir(path: str | os.PathLike) -> bool:
    """A prepare-data output (or any saved dataset with input_ids and loss_mask columns)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / PREPARE_CONFIG).is_file():
        return True
    info = path / "dataset_info.json"
    if not info.is_file():
        return False
    try:
        features = json.loads(info.read_text()).get("features") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return "input_ids" in features and "loss_mask" in features


def _prepare_params(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((path / PREPARE_CONFIG).read_text()).get("params") or {})
    except (OSError, json.JSONDecodeError):
        return {}


def resolve_prepared_input(cfg: DatagenConfig) -> PreparedInput:
    sources = cfg.sources()
    if not sources or any(not str(s).strip() for s in sources):
        raise UserError("--train-data-path: give a prepare-data output directory or a data source")
    if len(sources) == 1 and is_prepared_dir(sources[0]):
        path = Path(sources[0])
        params = _prepare_params(path)
        recorded = params.get("seq_length")
        if cfg.seq_length is not None and recorded is not None and int(recorded) != cfg.seq_length:
            raise UserError(
                f"--seq-length {cfg.seq_length}: {path} was prepared with --seq-length {recorded}; drop the flag, or "
                "pass the conversation source instead of the prepared directory to prepare it again"
            )
        return PreparedInput(path, sources, False, False, None, params)
    if any(is_prepared_dir(s) for s in sources):
        raise UserError("--train-data-path: a prepared directory cannot be mixed with other sources; pass one "
                        "prepared directory, or the conversation sources")
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    pcfg = PrepareConfig(model=cfg.target_model_path, data=sources[0] if len(sources) == 1 else sources,
                         output=str(cache_root / "pending"), seq_length=cfg.seq_length or DEFAULT_SEQ_LENGTH,
                         max_samples=cfg.max_samples, seed=cfg.seed)
    fp = prepare_fingerprint(pcfg)
    target = cache_root / f"prepared-{fp}"
    pcfg = pcfg.model_copy(update={"output": str(target)})
    result = prepare_data(pcfg)
    if result.cached:
        logger.info("datagen: reusing the prepared copy %s (fingerprint %s); nothing tokenized", target, fp)
    else:
        logger.info("datagen: prepared %d samples from %s into %s", result.kept, ", ".join(sources), target)
    return PreparedInput(target, sources, True, result.cached, cache_root, _prepare_params(target))


def _same_counts(path: Path, freq: dict[int, int]) -> bool:
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(old, dict) and {int(k): int(v) for k, v in old.items()} == freq


def token_freq_for(prepared: Path, data, total: int) -> dict[int, int]:
    """Counts over the loss-masked tokens of the first `total` rows (the ones datagen uses)."""
    if total == len(data) and (prepared / TOKEN_FREQ).is_file():
        saved = torch.load(prepared / TOKEN_FREQ, map_location="cpu", weights_only=True)
        return {int(k): int(v) for k, v in saved.items()}
    rows = data.select(range(total))
    return token_frequencies(rows["input_ids"], rows["loss_mask"])


def check_token_freq_target(path: str | os.PathLike, freq: dict[int, int]) -> Path | None:
    """The path to write, None when it already holds these counts; another file is refused up front."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--token-freq-path {path} is a directory; name a file (e.g. {path / TOKEN_FREQ})")
    if path.exists():
        if _same_counts(path, freq):
            return None
        raise UserError(
            f"--token-freq-path {path} exists and holds other token counts (another dataset's); it is not "
            "overwritten: pass another --token-freq-path, or move that file away"
        )
    return path


def write_token_freq(path: Path, freq: dict[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda tmp: torch.save(freq, tmp))

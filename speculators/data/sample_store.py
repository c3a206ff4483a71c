"""The sample-store protocol: what the training `Dataset` and the trainer read samples through.

Every source of training samples (the ``pt`` and ``safetensors`` layouts in
`speculators.data.formats`, the public package's layout in `speculators.data.public_format`,
the online store in `speculators.online.store`, anything registered with
`speculators.train.data_source.register_source`) is a `SampleStore`: ``__len__`` and
``load(i)`` are required; ``lengths``, ``prefetch``, ``close`` and ``fetches_ahead`` have
defaults a store overrides when it can do better, so callers never ask whether a store has them.
``check_verifier`` is the one check of a store's dimensions against the verifier.

This module imports no layout, so the layout modules share its pieces without importing
each other's.
"""

from __future__ import annotations

import logging
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch

from speculators.errors import UserError

logger = logging.getLogger(__name__)

OnCorrupt = Literal["skip", "raise"]


class CorruptSampleError(UserError):
    """A sample file cannot be read or does not match the dataset's schema."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), for one-line messages."""
    text = str(exc).strip()
    return (text.splitlines() or [""])[0][:200]


@dataclass(frozen=True)
class SampleSchema:
    """What every sample of a dataset must look like."""

    num_layers: int
    hidden_size: int

    def check(self, sample: dict[str, Any], where: str) -> None:
        """Raise `CorruptSampleError` naming ``where`` when ``sample`` breaks the schema."""
        for key in ("input_ids", "hidden_states", "loss_mask"):
            if key not in sample:
                raise CorruptSampleError(f"{where}: missing key {key!r}")
        ids, mask, hs = sample["input_ids"], sample["loss_mask"], sample["hidden_states"]
        if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
            raise CorruptSampleError(f"{where}: input_ids must be a 1-D tensor")
        length = ids.shape[0]
        if length < 2:
            raise CorruptSampleError(f"{where}: needs at least 2 tokens, has {length}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (length,):
            raise CorruptSampleError(f"{where}: loss_mask shape must be [{length}]")
        if len(hs) != self.num_layers:
            raise CorruptSampleError(
                f"{where}: has {len(hs)} hidden-state layers, data_config.json says {self.num_layers}"
            )
        for k, h in enumerate(hs):
            if tuple(h.shape) != (length, self.hidden_size):
                raise CorruptSampleError(
                    f"{where}: hidden_states[{k}] has shape {tuple(h.shape)}, "
                    f"expected ({length}, {self.hidden_size})"
                )


def warn_skipped(exc: CorruptSampleError, stacklevel: int) -> None:
    warnings.warn(f"skipping corrupt sample: {exc}", stacklevel=stacklevel)
    logger.warning("skipping corrupt sample: %s", exc)


class CorruptPolicy:
    """Skip-or-raise: a skipped sample is replaced by the next good one (each bad one warned once)."""

    def __init__(self, on_corrupt: OnCorrupt):
        if on_corrupt not in ("skip", "raise"):
            raise UserError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.bad: set[int] = set()

    def load_with_policy(self, i: int, n: int, read: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        if n == 0:
            raise IndexError("empty sample store")
        for step in range(n):
            j = (i + step) % n
            if j in self.bad:
                continue
            try:
                return read(j)
            except CorruptSampleError as exc:
                if self.on_corrupt == "raise":
                    raise
                self.bad.add(j)
                warn_skipped(exc, stacklevel=4)  # the caller of `load`
        raise CorruptSampleError(f"every sample in the store is corrupt (last asked for index {i})")


class SampleStore(ABC):
    """A source of raw training samples; see the module docstring.

    ``config`` is the flat view of the data's ``data_config.json`` (`speculators.data.data_config`:
    ``layer_ids``, ``hidden_size``, ``num_hidden_layers``, ...) and ``where`` names the data in
    messages; a store sets both when it knows them.
    """

    config: Mapping[str, Any] = MappingProxyType({})
    where: str = "the sample store"

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, i: int) -> dict[str, Any]:
        """Return ``{"input_ids": [L] long, "hidden_states": [[L,H], ...], "loss_mask": [L] long}``."""

    def load_stored(self, i: int) -> dict[str, Any]:
        """Sample ``i`` as stored: fp8 hidden states stay fp8, with their ``hidden_states_scale``
        (`speculators.data.hs_quant`), so the trainer dequantises them on its device. A store
        without fp8 serves `load` (the default)."""
        return self.load(i)

    def lengths(self) -> list[int]:
        """Token count per sample. This default loads every sample; stores that record lengths override it."""
        return [int(self.load(i)["input_ids"].shape[0]) for i in range(len(self))]

    @property
    def fetches_ahead(self) -> bool:
        """True when the store fetches samples ahead itself (`prefetch`): the trainer then adds no
        DataLoader worker processes."""
        return False

    def prefetch(self, order: Iterable[int]) -> None:
        """Told the store indices `load` will be called with next, in order (by default ignored)."""

    def close(self) -> None:
        """Release what the store holds (threads, requests in flight); by default nothing."""

    @property
    def layer_ids(self) -> list[int]:
        """The verifier layers the samples hold, final layer last ([] when the data does not say)."""
        return [int(x) for x in self.config.get("layer_ids") or []]

    @property
    def num_stored_layers(self) -> int | None:
        ids = self.config.get("layer_ids")
        if ids:
            return len(ids)
        return int(self.config["num_layers"]) if self.config.get("num_layers") is not None else None

    def check_verifier(
        self,
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_layers: int | None = None,
    ) -> None:
        """The one check of the data against the verifier it is trained with (and the draft).

        ``hidden_size``/``num_hidden_layers`` are the verifier's; ``num_layers`` counts the layers
        the draft expects stored, the final one included. A value the data does not record is not
        checked; a mismatch raises a `UserError` naming the data, before training starts.
        """
        c, where = self.config, self.where
        if hidden_size is not None and c.get("hidden_size") is not None and int(c["hidden_size"]) != int(hidden_size):
            raise UserError(
                f"{where}: hidden_size {c['hidden_size']} does not match the verifier's {hidden_size}; "
                "the data was generated with another model"
            )
        stored_n = c.get("num_hidden_layers")
        if num_hidden_layers is not None and stored_n is not None and int(stored_n) != int(num_hidden_layers):
            raise UserError(
                f"{where}: num_hidden_layers {stored_n} does not match the verifier's {num_hidden_layers}; "
                "the data was generated with another model"
            )
        stored = self.num_stored_layers
        if num_layers is not None and stored != int(num_layers):
            raise UserError(f"{where}: stores {stored} layers {c.get('layer_ids')}, the draft model expects {num_layers}")
        if num_hidden_layers is None:
            return
        layer_ids = self.layer_ids
        if not layer_ids and c.get("num_layers") not in (None, 4):
            raise UserError(
                f"{where}: the data holds {c['num_layers']} layers but names no layer ids (data format "
                "version 0); write its layer ids into data_config.json (hidden_states.layer_ids), or convert it with "
                "`speculators convert-data --data-format-version 0 --to pt` and record them there"
            )
        if layer_ids:
            from speculators.layers import check_layer_ids

            # The same rules datagen, launch-vllm and Eagle3Config apply (any number of aux layers >= 1).
            check_layer_ids(layer_ids, int(num_hidden_layers), flag=f"{where}: layer_ids")


class FileSampleStore(SampleStore):
    """A store over sample files in ``directory``: ``read_sample(i)`` reads position ``i`` or raises
    `CorruptSampleError`; ``load`` serves it through the skip-or-raise policy.
    ``sample_indices[i]`` is position ``i``'s sample index (its row in the prepared dataset)."""

    sample_indices: list[int]

    def __init__(self, directory: str | os.PathLike, on_corrupt: OnCorrupt):
        self.directory = Path(directory)
        self._policy = CorruptPolicy(on_corrupt)

    def __len__(self) -> int:
        return len(self.sample_indices)

    @abstractmethod
    def read_sample(self, i: int) -> dict[str, Any]:
        """Sample ``i`` (0..len-1), or `CorruptSampleError` naming what is wrong."""

    def load(self, i: int) -> dict[str, Any]:
        return self._policy.load_with_policy(i, len(self), self.read_sample)


def readable_samples(store: FileSampleStore, on_corrupt: str, skipped: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """A converter's pass over ``store`` in order: ``(sample index, sample)`` for each readable sample.

    A corrupt sample raises (``on_corrupt="raise"``) or is warned about, its index appended to
    ``skipped`` and passed over; when none was readable, a `UserError` says nothing was converted.
    """
    found = False
    for i in range(len(store)):
        try:
            sample = store.read_sample(i)
        except CorruptSampleError as exc:
            if on_corrupt == "raise":
                raise
            warn_skipped(exc, stacklevel=4)  # the converter's caller
            skipped.append(store.sample_indices[i])
            continue
        found = True
        yield store.sample_indices[i], sample
    if not found:
        raise UserError(f"{store.directory}: every sample was corrupt; nothing converted")

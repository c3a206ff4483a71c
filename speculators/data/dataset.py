"""Training samples for EAGLE-3: the shift, packing and padding.

A *sample store* (see `speculators.data.sample_store.SampleStore`) yields raw samples
``{"input_ids": [L], "hidden_states": [[L,H] x K], "loss_mask": [L]}`` where the
last of the K hidden-state layers is the verifier's final layer (pre final norm).

`Eagle3Dataset` applies the EAGLE shift. Position ``t`` of the draft sees the
verifier's aux hidden states at token ``t`` together with token ``t+1`` and learns
what the verifier predicts from position ``t+1``::

    input_ids                  = ids[1:]
    hidden_states              = cat(aux layers)[:-1]      # [L-1, (K-1)*H]
    verifier_last_hidden_states = last[1:]                  # [L-1, H]
    loss_mask                  = mask[1:]
    position_ids               = arange(1, L)

`Eagle3Collator` packs shifted samples into ``[B, total_seq_len]`` rows and adds
``document_ids`` (-1 on padding) for a block-diagonal attention mask.
`PackedBatchSampler` chooses index groups that fill a fixed number of rows.

fp8 stores (`speculators.data.hs_quant`) are read as stored (`SampleStore.load_stored`): the
shift and the collator move the e4m3 bits (uint8) and their per-row scales, and the trainer's
``to_device`` dequantises after the copy, so DataLoader workers never do.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from speculators.data.formats import open_sample_store
from speculators.data.hs_quant import SCALE_KEY, dequantise_groups, payload_scale_key
from speculators.data.sample_store import OnCorrupt, SampleStore
from speculators.errors import UserError

BatchType = dict[str, torch.Tensor]
PAYLOAD_KEYS = ("hidden_states", "verifier_last_hidden_states")  # what may travel as fp8 payload
PAYLOAD_SCALES = tuple(payload_scale_key(k) for k in PAYLOAD_KEYS)


def shift_sample(sample: dict[str, Any], max_len: int | None = None) -> dict[str, Any]:
    """Apply the EAGLE shift to one raw sample; truncate to ``max_len`` tokens after it."""
    ids = sample["input_ids"]
    layers = sample["hidden_states"]
    if len(layers) < 2:
        raise UserError(
            f"a sample has {len(layers)} hidden-state layer(s); EAGLE-3 needs at least one aux "
            "layer plus the verifier's final layer"
        )
    length = int(ids.shape[0])
    if length < 2:
        raise UserError(f"a sample has {length} token(s); at least 2 are needed for the shift")
    n = length - 1 if max_len is None else min(length - 1, max_len)  # slice before copying
    scales = sample.get(SCALE_KEY)
    if scales is not None:  # fp8 as stored: the bits as uint8, the scales beside them
        layers = [h.view(torch.uint8) for h in layers]
    out = {
        "input_ids": ids[1 : n + 1].long(),
        "hidden_states": torch.cat([h[:n] for h in layers[:-1]], dim=-1),
        "verifier_last_hidden_states": layers[-1][1 : n + 1],
        "loss_mask": sample["loss_mask"][1 : n + 1].long(),
        "position_ids": torch.arange(1, n + 1, dtype=torch.long),
        "length": n,
    }
    if scales is not None:
        out[payload_scale_key("hidden_states")] = torch.stack([s[:n].float() for s in scales[:-1]], dim=-1)
        out[payload_scale_key("verifier_last_hidden_states")] = scales[-1][1 : n + 1].float().unsqueeze(-1)
    return out


def is_payload(sample: dict[str, Any]) -> bool:
    """Whether a shifted sample carries its hidden states as fp8 payload (bits and scales)."""
    return payload_scale_key("hidden_states") in sample


def dequantised(sample: dict[str, Any]) -> dict[str, Any]:
    """A shifted sample's fp8 payload dequantised on the host (bf16), as a bf16 store's would be."""
    out = {k: v for k, v in sample.items() if k not in PAYLOAD_SCALES}
    for key in PAYLOAD_KEYS:
        out[key] = dequantise_groups(sample[key], sample[payload_scale_key(key)])
    return out


class Eagle3Dataset(Dataset):
    """Map-style dataset over a sample store, returning shifted samples.

    ``max_len`` (normally ``total_seq_len``) truncates long samples so each fits a row.
    ``indices`` restricts the dataset to a subset of the store (train/val split).
    ``dtype`` casts hidden states (None keeps the stored dtype, normally bf16); fp8 samples come
    as their payload (see the module docstring), cast by ``to_device`` after dequantising.
    """

    def __init__(
        self,
        store: SampleStore,
        max_len: int | None = None,
        indices: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.store = store
        self.max_len = max_len
        self.indices = list(range(len(store))) if indices is None else list(indices)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        store_i = self.indices[i]
        out = shift_sample(self.store.load_stored(store_i), self.max_len)
        if self.dtype is not None and not is_payload(out):  # fp8 payload: cast after the dequantisation
            out["hidden_states"] = out["hidden_states"].to(self.dtype)
            out["verifier_last_hidden_states"] = out["verifier_last_hidden_states"].to(self.dtype)
        return out

    def lengths(self) -> list[int]:
        """Shifted (and truncated) length of every item, for `PackedBatchSampler`."""
        all_lengths = self.store.lengths()
        out = []
        for idx in self.indices:
            n = max(int(all_lengths[idx]) - 1, 0)
            out.append(min(n, self.max_len) if self.max_len is not None else n)
        return out

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        max_len: int | None = None,
        on_corrupt: OnCorrupt = "skip",
        dtype: torch.dtype | None = None,
    ) -> "Eagle3Dataset":
        return cls(open_sample_store(path, on_corrupt), max_len=max_len, dtype=dtype)


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic shuffled train/val split of ``range(n)``."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def pack_rows(lengths: Sequence[int], total_seq_len: int) -> list[list[int]]:
    """First-fit packing of item positions into rows of ``total_seq_len`` tokens, order kept."""
    rows: list[list[int]] = []
    room: list[int] = []
    for pos, n in enumerate(lengths):
        n = min(int(n), total_seq_len)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(pos)
                room[r] -= n
                break
        else:
            rows.append([pos])
            room.append(total_seq_len - n)
    return rows


class Eagle3Collator:
    """Pack (``pack=True``) or pad (one sample per row) shifted samples to ``total_seq_len``.

    Returns ``input_ids, loss_mask, position_ids, document_ids [B, T]`` (long),
    ``hidden_states [B, T, (K-1)H]``, ``verifier_last_hidden_states [B, T, H]`` and
    ``lengths [n_docs]``. Padding has input_ids 0, loss_mask 0, position_ids 0 and
    document_ids -1. Document ids are unique within the batch (0..n_docs-1).

    fp8 samples (all of the batch) give the two hidden-state tensors as uint8 payload plus their
    ``*_scale`` tensors (0 on padding); a batch mixing fp8 and unscaled samples (an online run
    caching fp8 while other rows come unscaled) has its fp8 samples dequantised here instead.
    """

    def __init__(self, total_seq_len: int, pack: bool = True):
        if total_seq_len < 1:
            raise UserError(f"total_seq_len must be >= 1, got {total_seq_len}")
        self.total_seq_len = total_seq_len
        self.pack = pack

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> BatchType:
        samples = [s for s in samples if s is not None]
        if not samples:
            raise UserError("empty batch: no samples to collate")
        payload = [is_payload(s) for s in samples]
        if any(payload) and not all(payload):
            samples = [dequantised(s) if p else s for s, p in zip(samples, payload)]
            payload = [False]
        T = self.total_seq_len
        lengths = [min(int(s["input_ids"].shape[0]), T) for s in samples]
        rows = pack_rows(lengths, T) if self.pack else [[i] for i in range(len(samples))]
        B = len(rows)
        first = samples[0]
        aux_dim = first["hidden_states"].shape[-1]
        hid = first["verifier_last_hidden_states"].shape[-1]
        hs_dtype = next((s["hidden_states"].dtype for s in samples if not is_payload(s)), first["hidden_states"].dtype)
        batch = {
            "input_ids": torch.zeros(B, T, dtype=torch.long),
            "loss_mask": torch.zeros(B, T, dtype=torch.long),
            "position_ids": torch.zeros(B, T, dtype=torch.long),
            "document_ids": torch.full((B, T), -1, dtype=torch.long),
            "hidden_states": torch.zeros(B, T, aux_dim, dtype=hs_dtype),
            "verifier_last_hidden_states": torch.zeros(B, T, hid, dtype=hs_dtype),
        }
        keys = ["input_ids", "loss_mask", "position_ids", "hidden_states", "verifier_last_hidden_states"]
        if payload[0]:
            for key in PAYLOAD_KEYS:
                scale_key = payload_scale_key(key)
                batch[scale_key] = torch.zeros(B, T, first[scale_key].shape[-1], dtype=torch.float32)
                keys.append(scale_key)
        doc_lengths = []
        doc = 0
        for r, members in enumerate(rows):
            start = 0
            for m in members:
                s, n = samples[m], lengths[m]
                end = start + n
                for key in keys:
                    batch[key][r, start:end] = s[key][:n]
                batch["document_ids"][r, start:end] = doc
                doc_lengths.append(n)
                doc += 1
                start = end
        batch["lengths"] = torch.tensor(doc_lengths, dtype=torch.long)
        return batch


class PackedBatchSampler(Sampler[list[int]]):
    """Group dataset indices so each group packs into exactly ``rows`` rows of ``total_seq_len``.

    Shuffles per epoch (``set_epoch``) with ``seed``; with ``world_size > 1`` each rank
    gets every ``world_size``-th batch and all ranks get the same number of batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        total_seq_len: int,
        rows: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths = [min(int(n), total_seq_len) for n in lengths]
        self.total_seq_len = total_seq_len
        self.rows = rows
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        # Incremental first-fit: gives the same rows as `pack_rows` on the batch.
        batches: list[list[int]] = []
        current: list[int] = []
        room: list[int] = []
        for idx in order:
            n = self.lengths[idx]
            if n == 0:
                continue
            fit = next((r for r, free in enumerate(room) if n <= free), None)
            if fit is None and len(room) == self.rows:
                batches.append(current)
                current, room = [], []
            if fit is None:
                room.append(self.total_seq_len - n)
            else:
                room[fit] -= n
            current.append(idx)
        if current:
            batches.append(current)
        return batches

    def _mine(self) -> list[list[int]]:
        batches = self._all_batches()
        per_rank = len(batches) // self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank :: self.world_size][:per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())

"""Online / hybrid sample store: hidden states requested from vLLM while training runs.

`OnlineSampleStore` implements the sample-store protocol
(`speculators.data.sample_store.SampleStore`) over the rows of a prepared dataset
(``input_ids``, ``loss_mask``). Its cache ``hidden_states_path`` is a pt-layout directory
(``data_<row>.pt``, datagen's format) read and written with `speculators.data.formats`'
functions. For a row whose hidden states are not there it follows ``on_missing``:

* ``generate``: request them from the vLLM server (retried with backoff, bounded
  wait); ``on_generate="cache"`` then writes ``data_<row>.pt`` so later epochs and
  later runs read the disk (hybrid mode); ``"delete"`` keeps nothing.
* ``skip``: the store only covers rows already on disk.
* ``raise``: refuse to start when any row is missing.

Prefetch: `prefetch(order)` tells the store which rows come next (the trainer calls
it once per epoch with this rank's sample order); up to ``prefetch_depth`` requests
then run ahead of `load` on a thread pool so the accelerator does not wait on the server.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch

from speculators.config.train import TrainConfig
from speculators.data import data_config as dc
from speculators.data.data_config import DATA_CONFIG_NAME
from speculators.data.formats import (
    DATA_FORMAT_VERSION,
    finished_pt_indices,
    pt_file_name,
    read_pt_sample,
    write_pt_sample,
)
from speculators.data.hs_quant import RECORDED_NAME, HiddenStatesDtype, check_choice, decoded, \
    encode_hidden_states, storage_of
from speculators.data.sample_store import CorruptSampleError, SampleSchema, SampleStore
from speculators.errors import UserError
from speculators.vllm.client import ClientConfig, HiddenStatesClient
from speculators.vllm.retry import RetryPolicy

logger = logging.getLogger(__name__)

OnMissing = Literal["generate", "skip", "raise"]
OnGenerate = Literal["delete", "cache"]


@dataclass
class OnlineConfig:
    # the defaults are the `speculators train` flags' (speculators.config.train), decided there once
    endpoint: str | None = None
    hidden_states_path: str | None = None
    on_missing: OnMissing = TrainConfig.model_fields["on_missing"].default
    on_generate: OnGenerate = TrainConfig.model_fields["on_generate"].default
    prefetch_depth: int = TrainConfig.model_fields["prefetch"].default
    workers: int = TrainConfig.model_fields["vllm_workers"].default
    model: str | None = None
    request_timeout_s: float = TrainConfig.model_fields["vllm_timeout"].default
    max_wait_s: float = TrainConfig.model_fields["vllm_max_wait"].default
    layer_ids: list[int] | None = None  # the server's layer ids: checked by value, recorded in data_config.json
    api_key: str | None = None  # the server's --api-key ($VLLM_API_KEY)
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    verifier: str | None = None
    data: str | None = None
    hidden_dtype: torch.dtype = torch.bfloat16
    # how --on-generate cache stores samples (None: what the cache records, else bf16); see data.hs_quant
    store_dtype: HiddenStatesDtype | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """The rules between the online settings (each one's choices and bounds are the schema's)."""
        if self.on_missing == "generate" and not self.endpoint:
            raise UserError("--on-missing generate needs --vllm-endpoint URL (a `speculators launch-vllm` server)")
        if self.on_missing != "generate" and not self.hidden_states_path:
            raise UserError(f"--on-missing {self.on_missing} needs --hidden-states-path DIR (the cached samples)")
        if self.on_generate == "cache" and not self.hidden_states_path:
            raise UserError("--on-generate cache needs --hidden-states-path DIR to cache into")


class PreparedRows:
    """Read-only view of a prepared dataset's ``input_ids``/``loss_mask`` columns."""

    def __init__(self, rows: Any):
        self.rows = rows

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "PreparedRows":
        from datasets import load_from_disk

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"--prepared-data {path} is not a directory written by `speculators prepare-data`")
        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"--prepared-data {path}: not a saved dataset ({exc})") from exc
        missing = {"input_ids", "loss_mask"} - set(ds.column_names)
        if missing:
            raise UserError(f"--prepared-data {path}: lacks column(s) {sorted(missing)}")
        return cls(ds)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> tuple[list[int], list[int]]:
        row = self.rows[i]
        return list(row["input_ids"]), list(row["loss_mask"])

    def lengths(self) -> list[int]:
        if hasattr(self.rows, "column_names"):
            return [len(x) for x in self.rows["input_ids"]]
        return [len(r["input_ids"]) for r in self.rows]


class OnlineSampleStore(SampleStore):
    """See the module docstring. Safe to pickle into DataLoader workers (pools restart lazily)."""

    def __init__(self, rows: PreparedRows, config: OnlineConfig, client: HiddenStatesClient | None = None):
        config.validate()
        self.rows = rows
        self.online = config
        self.cache_dir = Path(config.hidden_states_path) if config.hidden_states_path else None
        if self.cache_dir is not None and config.on_generate == "cache":
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._adopt_cache_config()
        n = len(rows)
        on_disk = {row for row in finished_pt_indices(self.cache_dir) if row < n} if self.cache_dir else set()
        if config.on_missing == "skip":
            self.index = sorted(on_disk)
            if not self.index:
                raise UserError(
                    f"--on-missing skip: no cached samples (data_<i>.pt) in --hidden-states-path {self.cache_dir}"
                )
        else:
            self.index = list(range(n))
            missing = [i for i in self.index if i not in on_disk]
            if config.on_missing == "raise" and missing:
                raise UserError(
                    f"--on-missing raise: {len(missing)} of {n} samples have no hidden states in "
                    f"{self.cache_dir} (first: {missing[:5]}); run `speculators datagen` or use --on-missing generate"
                )
        self._client = client
        self._init_runtime()
        self.stats = collections.Counter()

    def set_layer_ids(self, layer_ids: list[int]) -> None:
        """The ids every response is checked against (count per file, values via the server record)."""
        self.online.layer_ids = [int(i) for i in layer_ids]
        if self._client is not None:
            self._client.config.layer_ids = list(self.online.layer_ids)
            self._client.config.num_layers = len(self.online.layer_ids)

    # -- runtime state (per process) -------------------------------------------------
    def _init_runtime(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future] = {}
        self._plan: list[int] = []  # store indices planned for this epoch
        self._plan_pos = 0  # next plan entry not yet submitted
        self._plan_where: dict[int, int] = {}
        self._mutex = threading.Lock()
        self._config_written = self.cache_dir is not None and (self.cache_dir / DATA_CONFIG_NAME).exists()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_pool", "_futures", "_plan", "_plan_pos", "_plan_where", "_mutex"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def close(self) -> None:
        """Cancel queued requests and stop the pool (in-flight ones finish)."""
        with self._mutex:
            for fut in self._futures.values():
                fut.cancel()
            self._futures.clear()
            self._plan, self._plan_pos, self._plan_where = [], 0, {}
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    @property
    def client(self) -> HiddenStatesClient:
        if self._client is None:
            c = self.online
            self._client = HiddenStatesClient(
                ClientConfig(
                    endpoint=c.endpoint or "",
                    model=c.model,
                    request_timeout_s=c.request_timeout_s,
                    retry=RetryPolicy(max_wait_s=c.max_wait_s),
                    num_layers=len(c.layer_ids) if c.layer_ids else None,
                    layer_ids=list(c.layer_ids) if c.layer_ids else None,
                    api_key=c.api_key,
                )
            )
        return self._client

    def _adopt_cache_config(self) -> None:
        """Cached samples from an earlier run or offline datagen must hold the same layers; the
        dimensions they record are what `config` reports, so `check_verifier` compares the files'."""
        self._cached_dims: dict[str, int] = {}
        c = self.online
        if c.store_dtype is not None:
            check_choice(c.store_dtype)
        path = self.cache_dir / DATA_CONFIG_NAME if self.cache_dir is not None else None
        existing = dc.load(path) if path is not None else None  # either version of the file
        if existing is None:
            c.store_dtype = c.store_dtype or "bf16"
            return
        recorded = storage_of(existing.get("hidden_states_dtype"), str(path))
        if c.store_dtype is not None and c.store_dtype != recorded:
            raise UserError(
                f"{path}: cached samples are stored as {recorded}, --hidden-states-dtype is {c.store_dtype}; "
                "use another --hidden-states-path (one cache holds one storage dtype)"
            )
        c.store_dtype = recorded
        theirs = existing.get("layer_ids")
        if theirs and c.layer_ids and list(theirs) != list(c.layer_ids):
            raise UserError(
                f"{path}: cached samples hold layers {theirs}, the server exports {c.layer_ids} "
                "(--vllm-layer-ids); use another --hidden-states-path"
            )
        if theirs and not c.layer_ids:
            c.layer_ids = [int(i) for i in theirs]
        if existing.get("format", "pt") != "pt":
            raise UserError(f"{path}: format {existing.get('format')!r}; online caching needs the pt layout")
        self._cached_dims = {k: int(existing[k]) for k in ("hidden_size", "num_hidden_layers") if existing.get(k)}
        c.hidden_size = c.hidden_size or existing.get("hidden_size")
        c.num_hidden_layers = c.num_hidden_layers or existing.get("num_hidden_layers")

    @property
    def config(self) -> dict[str, Any]:
        """What the trainer checks, shaped like datagen's data_config.json."""
        c = self.online
        out: dict[str, Any] = {"version": DATA_FORMAT_VERSION, "format": "online"}
        if c.layer_ids:
            out["layer_ids"] = list(c.layer_ids)
        if c.hidden_size:
            out["hidden_size"] = c.hidden_size
        if c.num_hidden_layers:
            out["num_hidden_layers"] = c.num_hidden_layers
        out.update(self._cached_dims)
        return out

    @property
    def where(self) -> str:  # type: ignore[override]
        if self.cache_dir is not None:
            return str(self.cache_dir / DATA_CONFIG_NAME)
        return f"the vLLM server at {self.online.endpoint}"

    @property
    def fetches_ahead(self) -> bool:
        return True

    def _cache_schema(self) -> SampleSchema | None:
        """What a cached sample must hold, once the layers and the hidden size are known."""
        c = self.online
        hidden = self._cached_dims.get("hidden_size", c.hidden_size)
        return SampleSchema(len(c.layer_ids), int(hidden)) if c.layer_ids and hidden else None

    # -- protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> list[int]:
        all_lengths = self.rows.lengths()
        return [all_lengths[r] for r in self.index]

    def load(self, i: int) -> dict[str, Any]:
        return decoded(self.load_stored(i), f"{self.where} row {self.index[i]}")

    def load_stored(self, i: int) -> dict[str, Any]:
        """Sample ``i``; an fp8 cache's samples (read back, or just generated and cached) as stored."""
        row = self.index[i]
        self._advance_plan(i)
        with self._mutex:
            fut = self._futures.pop(i, None)
        if fut is not None:
            self.stats["prefetched"] += 1
            sample = fut.result()
        else:
            sample = self._read_cached(row)
            if sample is not None:
                self.stats["disk"] += 1
            else:
                self.stats["on_demand"] += 1
                sample = self._generate(row)
        self._top_up()
        return sample

    # -- prefetch --------------------------------------------------------------------
    def prefetch(self, order: Iterable[int]) -> None:
        """Plan the store indices `load` will be called with next, in order."""
        if self.online.on_missing != "generate" or self.online.prefetch_depth == 0:
            return
        plan = [int(i) for i in order]
        with self._mutex:
            self._plan, self._plan_pos = plan, 0
            self._plan_where = {i: pos for pos, i in enumerate(plan)}
            for i in [i for i in self._futures if i not in self._plan_where]:
                self._futures.pop(i).cancel()  # left from an earlier plan: free the slot
        self._top_up()

    def _advance_plan(self, i: int) -> None:
        """When the trainer asks for a planned index not yet submitted, skip the plan past it."""
        with self._mutex:
            pos = self._plan_where.get(i)
            if i not in self._futures and pos is not None and pos >= self._plan_pos:
                self._plan_pos = pos + 1

    def _top_up(self) -> None:
        with self._mutex:
            depth = self.online.prefetch_depth
            while self._plan_pos < len(self._plan) and len(self._futures) < depth:
                i = self._plan[self._plan_pos]
                self._plan_pos += 1
                if i in self._futures:
                    continue
                row = self.index[i]
                if self.cache_dir is not None and (self.cache_dir / pt_file_name(row)).exists():
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.online.workers, thread_name_prefix="online-hs")
                self._futures[i] = self._pool.submit(self._generate, row)

    # -- disk and server -------------------------------------------------------------
    def _read_cached(self, row: int) -> dict[str, Any] | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / pt_file_name(row)
        if not path.exists():
            return None
        try:
            return read_pt_sample(path, self._cache_schema(), decode=False)
        except CorruptSampleError as exc:  # a corrupt cache file: regenerate rather than stop
            if self.online.on_missing != "generate":
                raise UserError(f"{exc}; delete it or use --on-missing generate") from exc
            logger.warning("%s; requesting it again", exc)
            return None

    def _generate(self, row: int) -> dict[str, Any]:
        input_ids, loss_mask = self.rows.get(row)
        hs = self.client.fetch(input_ids)  # [L, K, H]
        sample = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "hidden_states": [h.to(self.online.hidden_dtype).contiguous() for h in hs.unbind(1)],
            "loss_mask": torch.tensor(loss_mask, dtype=torch.long),
        }
        if self.online.on_generate == "cache" and self.cache_dir is not None:
            stored = {**sample, **encode_hidden_states(sample["hidden_states"], self.online.store_dtype or "bf16")}
            self._write_cache(row, stored)
            if self.online.store_dtype == "fp8":  # train on what later epochs will read back
                return stored  # as stored (fp8 and scales): dequantised where the step runs
        return sample

    def _write_cache(self, row: int, sample: dict[str, Any]) -> None:
        assert self.cache_dir is not None
        write_pt_sample(self.cache_dir, row, sample)
        with self._mutex:
            self.stats["cached"] += 1
        if not self._config_written:
            with self._mutex:
                if not self._config_written:
                    cfg_path = self.cache_dir / DATA_CONFIG_NAME
                    if not cfg_path.exists():
                        dc.write(cfg_path, self._data_config(sample))
                    self._config_written = True

    def _recorded_layer_ids(self) -> list[int] | None:
        """The ids the samples hold: the configured ones, else the server's record (never guessed)."""
        if self.online.layer_ids:
            return list(self.online.layer_ids)
        client = self._client
        return list(client.server_layer_ids) if client is not None and client.server_layer_ids else None

    def _data_config(self, sample: dict[str, Any]) -> dict[str, Any]:
        import importlib.metadata as md

        def version(pkg: str) -> str | None:
            try:
                return md.version(pkg)
            except md.PackageNotFoundError:
                return None

        k = len(sample["hidden_states"])
        unscaled = str(self.online.hidden_dtype).replace("torch.", "")
        stored = RECORDED_NAME["fp8"] if self.online.store_dtype == "fp8" else unscaled
        return {
            "version": DATA_FORMAT_VERSION,
            "format": "pt",
            "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "packages": {p: version(p) for p in ("speculators", "torch", "transformers")},
            "model": self.online.verifier or self.online.model,
            "data": self.online.data,
            "layer_ids": self._recorded_layer_ids(),
            "hidden_size": int(sample["hidden_states"][0].shape[-1]),
            "num_hidden_layers": self.online.num_hidden_layers,
            "hidden_states_dtype": stored,
            "generator": {"backend": "vllm-online", "endpoint": self.online.endpoint},
            "schema": dc.tensor_schema(k, int(sample["hidden_states"][0].shape[-1]), stored),
            **self.online.extra_config,
        }


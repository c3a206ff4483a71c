"""On-disk hidden-state layouts and the sample stores that read them.

Two layouts live behind the sample-store protocol (`speculators.data.sample_store.SampleStore`):

* ``pt`` (data format version 1): one ``data_<i>.pt`` per sample holding
  ``{"input_ids": LongTensor[L], "hidden_states": [Tensor[L,H], ...],
  "loss_mask": LongTensor[L]}``; ``i`` is the sample's row in the prepared dataset.
* ``safetensors``: shards ``shards/shard_<k>.safetensors`` written by
  ``speculators convert-data``. Each shard concatenates its samples' tokens:
  ``input_ids [N] int64``, ``loss_mask [N] uint8``, ``hidden_states [K, N, H]``
  (K layers, in ``layer_ids`` order; each layer's tokens contiguous, like K
  per-sample tensors), ``offsets [n+1] int64`` and ``sample_index [n] int64``.
  Reading a sample is a zero-copy view of a memory-mapped shard instead of
  opening and unpickling a file.

Both directories carry ``data_config.json``; `open_sample_store` reads it and
returns the right store, so callers never look at the layout. A third layout, the
public `speculators` package's (``hidden_states/hs_<i>.safetensors`` beside an arrow
dataset), is detected by its shape and read by `speculators.data.public_format`; the
conversions to and from it are in `speculators.data.public_convert`.
"""

from __future__ import annotations

import json
import os
import re
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch

from speculators.atomic import atomic_write_bytes
from speculators.data import data_config as dc
from speculators.data.data_config import DATA_CONFIG_NAME
from speculators.data.hs_quant import (FP8, SCALE_KEY, HiddenStatesDtype, check_scaled, decode_hidden_states, decoded,
                                       encode_hidden_states, storage_of)
from speculators.data.public_format import PublicSampleStore, is_public_layout, open_public_store
from speculators.data.sample_store import (
    CorruptSampleError,
    FileSampleStore,
    SampleStore,
    OnCorrupt,
    SampleSchema,
    first_line,
    readable_samples,
)
from speculators.errors import UserError

DATA_FORMAT_VERSION = 1
DATA_FORMAT_VERSIONS = (0, 1)
V0_KEYS = ("input_ids", "loss_mask", "hidden_state", "target")
V1_KEYS = ("input_ids", "hidden_states", "loss_mask")
SHARD_DIR = "shards"
_PT_NAME = re.compile(r"^data_(\d+)\.pt$")


def pt_file_name(index: int) -> str:
    """The one file-name rule of the pt layout (datagen, the stores and the online cache use it)."""
    return f"data_{index}.pt"


def read_data_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The flat view (`speculators.data.data_config`) of DIR/data_config.json, either version."""
    path = Path(directory) / DATA_CONFIG_NAME
    config = dc.load(path)
    if config is None:
        raise UserError(
            f"{path} not found: --data-path must be a directory written by "
            "`speculators datagen` (or `speculators convert-data`)"
        )
    version = config.get("version")
    if version != DATA_FORMAT_VERSION:
        raise UserError(
            f"{path}: data format version {version!r} is not supported (expected {DATA_FORMAT_VERSION})"
        )
    for key in ("layer_ids", "hidden_size"):
        if key not in config:
            raise UserError(f"{path} lacks {key!r}; regenerate the data with `speculators datagen`")
    return config


class DataFormatVersionError(UserError):
    """A sample file in the other layout than --data-format-version names (never skipped)."""


def check_layout(sample: Any, where: str, data_format_version: int) -> None:
    """Refuse a sample file that is not in the layout `data_format_version` names,
    naming the file and the keys found."""
    keys = sorted(sample) if isinstance(sample, dict) else None
    want = V0_KEYS if data_format_version == 0 else V1_KEYS
    if keys is not None and all(k in sample for k in want):
        return
    other = 1 if data_format_version == 0 else 0
    hint = ""
    if keys is not None and all(k in sample for k in (V1_KEYS if other == 1 else V0_KEYS)):
        hint = f"; it is in data format version {other}: pass --data-format-version {other}"
    found = f"keys {keys}" if keys is not None else f"a {type(sample).__name__}"
    raise DataFormatVersionError(
        f"{where}: not data format version {data_format_version} (expects keys {list(want)}), "
        f"found {found}{hint}"
    )


def v0_to_v1(sample: dict[str, Any], where: str) -> dict[str, Any]:
    """A version-0 sample (``hidden_state [L, K*H]`` = aux layers concatenated, ``target [L, H]``
    = the final layer) as a version-1 sample (``hidden_states`` = K aux tensors, then the final)."""
    hs, target = sample["hidden_state"], sample["target"]
    if not isinstance(hs, torch.Tensor) or not isinstance(target, torch.Tensor) or hs.ndim != 2 or target.ndim != 2:
        raise CorruptSampleError(f"{where}: hidden_state and target must be 2-D tensors")
    hidden = int(target.shape[-1])
    if hidden == 0 or hs.shape[-1] % hidden:
        raise CorruptSampleError(
            f"{where}: hidden_state has {hs.shape[-1]} columns, not a multiple of target's {hidden}"
        )
    return {
        "input_ids": sample["input_ids"],
        "hidden_states": [*hs.split(hidden, dim=-1), target],
        "loss_mask": sample["loss_mask"],
    }


def infer_v0_config(directory: Path) -> dict[str, Any]:
    """What data_config.json would say of a version-0 directory without one (from its first file)."""
    indices = sorted(finished_pt_indices(directory))
    if not indices:
        raise UserError(f"{directory}: no data_<i>.pt files found (data format version 0)")
    path = directory / pt_file_name(indices[0])
    try:
        sample = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot be read ({type(exc).__name__}: {first_line(exc)})") from exc
    check_layout(sample, str(path), 0)
    converted = v0_to_v1(sample, str(path))
    return {
        "version": DATA_FORMAT_VERSION,
        "format": "pt",
        "hidden_size": int(sample["target"].shape[-1]),
        "num_layers": len(converted["hidden_states"]),
        "inferred_from": str(path),
    }


def read_pt_sample(
    path: Path,
    schema: SampleSchema | None,
    data_format_version: int = DATA_FORMAT_VERSION,
    storage: HiddenStatesDtype | None = None,
    decode: bool = True,
) -> dict[str, Any]:
    """The one reader of a ``data_<i>.pt`` file: its layout and (given a schema) its dimensions
    checked, a version-0 file served as version 1; `CorruptSampleError` naming the file otherwise.
    ``schema`` None checks the layout only (an online cache whose dimensions are not known yet).

    fp8 files (`speculators.data.hs_quant`) are served dequantised to bf16 (``decode=False``: as
    stored, with their ``hidden_states_scale``, for a converter and the training loader).
    ``storage``, when given, is what the store's data_config.json records; a file that disagrees
    is corrupt."""
    try:
        # mmap: tensors are views of the page cache; the Dataset's shift copies them once.
        sample = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # any unpickling/zip error means the file is unusable
        raise CorruptSampleError(f"{path}: cannot be read ({type(exc).__name__}: {first_line(exc)})") from exc
    check_layout(sample, str(path), data_format_version)
    if data_format_version == 0:
        sample = v0_to_v1(sample, str(path))
    if schema is not None:
        schema.check(sample, str(path))
    scaled = SCALE_KEY in sample
    if storage is not None and scaled != (storage == "fp8"):
        raise CorruptSampleError(
            f"{path}: holds {'fp8' if scaled else 'unscaled'} hidden states, data_config.json records {storage}")
    out = {"input_ids": sample["input_ids"].long(), "loss_mask": sample["loss_mask"].long()}
    try:
        if not decode:
            check_scaled(sample, str(path))
            out["hidden_states"] = list(sample["hidden_states"])
            if scaled:
                out[SCALE_KEY] = list(sample[SCALE_KEY])
            return out
        out["hidden_states"] = decode_hidden_states(sample, str(path))
    except ValueError as exc:
        raise CorruptSampleError(str(exc)) from exc
    return out


class _OwnLayoutStore(FileSampleStore):
    """What our two layouts share: the directory, its data_config.json (read unless given) and the
    sample schema; `load` serves the layout's `read_sample` through the skip-or-raise policy."""

    def __init__(
        self,
        directory: str | os.PathLike,
        on_corrupt: OnCorrupt = "skip",
        config: dict[str, Any] | None = None,
        data_format_version: int = DATA_FORMAT_VERSION,
    ):
        super().__init__(directory, on_corrupt)
        if data_format_version not in DATA_FORMAT_VERSIONS:
            raise UserError(f"--data-format-version {data_format_version!r}: choose 0 or 1")
        self.data_format_version = data_format_version
        self.config = config if config is not None else read_data_config(self.directory)
        self.where = str(self.directory / DATA_CONFIG_NAME)
        num_layers = self.num_stored_layers
        if num_layers is None:
            raise UserError(f"{self.where} names neither layer_ids nor num_layers; regenerate the data with "
                            "`speculators datagen`")
        self.schema = SampleSchema(num_layers, int(self.config["hidden_size"]))
        # bf16 or fp8 on disk (absent in stores written before fp8: bf16); served as bf16 either way
        self.storage: HiddenStatesDtype = storage_of(self.config.get("hidden_states_dtype"), self.where)
        self.decode = True  # False: samples as stored (a converter copying fp8 as it is)
        self._index()

    @abstractmethod
    def _index(self) -> None:
        """Find the samples (``sample_indices``) in the layout's files."""

    @abstractmethod
    def read_sample(self, i: int, decode: bool | None = None) -> dict[str, Any]:
        """Sample ``i``; ``decode`` (default: the store's ``decode``) dequantises fp8 hidden states."""

    def load_stored(self, i: int) -> dict[str, Any]:
        return self._policy.load_with_policy(i, len(self), lambda j: self.read_sample(j, decode=False))


class PtSampleStore(_OwnLayoutStore):
    """Reads ``data_<i>.pt`` files (data format version 1, or 0 when opened with
    ``data_format_version=0``: ``hidden_state`` [L, K*H] + ``target`` [L, H], served as version 1).

    ``on_corrupt="skip"`` warns naming the bad file and serves the next good sample
    instead, so one broken file does not end a long run; ``"raise"`` stops.
    """

    def _index(self) -> None:
        self.sample_indices = sorted(finished_pt_indices(self.directory))
        self._lengths: list[int] | None = None

    def path(self, i: int) -> Path:
        return self.directory / pt_file_name(self.sample_indices[i])

    def read_sample(self, i: int, decode: bool | None = None) -> dict[str, Any]:
        storage = self.storage if self.data_format_version == DATA_FORMAT_VERSION else None
        return read_pt_sample(self.path(i), self.schema, self.data_format_version, storage,
                              self.decode if decode is None else decode)

    def lengths(self) -> list[int]:
        """Token count per sample (from data_config.json when recorded, else read lazily)."""
        if self._lengths is None:
            recorded = {int(k): int(v) for k, v in (self.config.get("lengths") or {}).items()}
            out = []
            for idx in self.sample_indices:
                if idx in recorded:
                    out.append(recorded[idx])
                    continue
                path = self.directory / pt_file_name(idx)
                try:
                    sample = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    out.append(int(sample["input_ids"].shape[0]))
                except Exception:
                    out.append(0)  # corrupt; load() deals with it
            self._lengths = out
        return self._lengths


class SafetensorsSampleStore(_OwnLayoutStore):
    """Reads the sharded safetensors layout written by `convert_pt_to_safetensors`."""

    def _index(self) -> None:
        shards = self.config.get("shards")
        if not shards:
            raise UserError(f"{self.directory / DATA_CONFIG_NAME}: format is safetensors but lists no shards")
        self._shards: list[dict[str, Any]] = shards
        # Flat index -> (shard number, row within shard).
        self._position: list[tuple[int, int]] = []
        self._lengths: list[int] = []
        self.sample_indices: list[int] = []
        for k, shard in enumerate(shards):
            for row, (idx, length) in enumerate(zip(shard["sample_index"], shard["lengths"])):
                self._position.append((k, row))
                self.sample_indices.append(int(idx))
                self._lengths.append(int(length))
        self._handles: dict[int, _MappedSafetensors] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # memory maps do not pickle; workers map the shards again
        return state

    def lengths(self) -> list[int]:
        return self._lengths

    def _shard(self, k: int) -> "_MappedSafetensors":
        if self._pid != os.getpid():  # DataLoader worker after fork: map again
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            path = self.directory / self._shards[k]["file"]
            try:
                self._handles[k] = _MappedSafetensors(path)
            except Exception as exc:
                raise CorruptSampleError(f"{path}: cannot be opened ({type(exc).__name__}: {first_line(exc)})") from exc
        return self._handles[k]

    def read_sample(self, i: int, decode: bool | None = None) -> dict[str, Any]:
        k, row = self._position[i]
        shard = self._shard(k)
        where = f"{shard.path} row {row}"
        try:
            offsets = shard.tensor("offsets")
            a, b = int(offsets[row]), int(offsets[row + 1])
            hidden = shard.tensor("hidden_states")[:, a:b]
            ids = shard.tensor("input_ids")[a:b]
            mask = shard.tensor("loss_mask")[a:b]
            scale = shard.tensor(SCALE_KEY)[:, a:b] if shard.has(SCALE_KEY) else None
        except Exception as exc:
            raise CorruptSampleError(f"{where}: unreadable ({type(exc).__name__}: {first_line(exc)})") from exc
        if hidden.ndim != 3 or (hidden.shape[0], hidden.shape[2]) != (self.schema.num_layers, self.schema.hidden_size):
            raise CorruptSampleError(
                f"{where}: hidden_states has shape {tuple(hidden.shape)}, expected "
                f"({self.schema.num_layers}, tokens, {self.schema.hidden_size})"
            )
        if ids.shape[0] != b - a or mask.shape[0] != b - a or b - a < 2:
            raise CorruptSampleError(f"{where}: token range {a}:{b} does not fit the shard")
        if (scale is not None) != (self.storage == "fp8"):
            raise CorruptSampleError(f"{where}: {'has' if scale is not None else 'lacks'} {SCALE_KEY}, "
                                     f"data_config.json records {self.storage}")
        sample: dict[str, Any] = {"input_ids": ids.long(), "hidden_states": list(hidden.unbind(0)),
                                  "loss_mask": mask.long()}
        if scale is not None:
            sample[SCALE_KEY] = list(scale.unbind(0))
            try:
                check_scaled(sample, where)
            except ValueError as exc:
                raise CorruptSampleError(str(exc)) from exc
            if self.decode if decode is None else decode:
                sample = decoded(sample, where)
        return sample


_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": FP8,
}


class _MappedSafetensors:
    """A safetensors file memory-mapped once; tensors are zero-copy views into the map.

    safetensors' own ``get_slice`` copies every slice; a training sample is read
    once and immediately copied into the batch, so a view saves one full copy.
    """

    def __init__(self, path: Path):
        import mmap
        import struct

        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            # Private (copy-on-write) map: writable for torch.frombuffer, never written back.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._base = 8 + n
        self._meta = {k: v for k, v in header.items() if k != "__metadata__"}
        self._cache: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        return name in self._meta

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            meta = self._meta[name]
            begin, end = meta["data_offsets"]
            dtype = _ST_DTYPES[meta["dtype"]]
            count = (end - begin) // torch.empty((), dtype=dtype).element_size()
            flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._base + begin) if count else torch.empty(0, dtype=dtype)
            self._cache[name] = flat.view(meta["shape"])
        return self._cache[name]


def open_sample_store(
    directory: str | os.PathLike,
    on_corrupt: OnCorrupt = "skip",
    data_format_version: int = DATA_FORMAT_VERSION,
) -> PtSampleStore | SafetensorsSampleStore | PublicSampleStore:
    """Open a datagen output directory whatever its layout.

    ``data_format_version`` 0 reads the older per-sample layout (a directory of ``data_<i>.pt``
    with ``hidden_state``/``target``; data_config.json optional); its first file is checked
    here, so the wrong version fails before anything else, naming the file and its keys.
    The data's dimensions are checked against a verifier by ``store.check_verifier``.
    """
    directory = Path(directory)
    if data_format_version not in DATA_FORMAT_VERSIONS:
        raise UserError(f"--data-format-version {data_format_version!r}: choose 0 or 1")
    if data_format_version == 1 and is_public_layout(directory):  # the public package's layout, detected
        return open_public_store(directory, on_corrupt)
    if data_format_version == 0:
        config = infer_v0_config(directory)  # also refuses a version-1 first file
        recorded = dc.load(directory / DATA_CONFIG_NAME)
        if recorded is not None:  # e.g. one we wrote: keep its layer ids and model
            for key in ("layer_ids", "num_hidden_layers", "model"):
                if key in recorded:
                    config[key] = recorded[key]
            if recorded.get("layer_ids") and len(recorded["layer_ids"]) != config["num_layers"]:
                raise UserError(
                    f"{directory / DATA_CONFIG_NAME}: layer_ids {recorded['layer_ids']} name "
                    f"{len(recorded['layer_ids'])} layers, {config['inferred_from']} holds {config['num_layers']}"
                )
    else:
        if not (directory / DATA_CONFIG_NAME).is_file() and finished_pt_indices(directory):
            first = directory / pt_file_name(min(finished_pt_indices(directory)))
            try:  # say what the files are when they are the older layout
                check_layout(torch.load(first, map_location="cpu", weights_only=True, mmap=True), str(first), 1)
            except DataFormatVersionError:
                raise
            except Exception:
                pass
        config = read_data_config(directory)
    where = directory / DATA_CONFIG_NAME
    fmt = config.get("format", "pt")
    if fmt == "pt":
        store: PtSampleStore | SafetensorsSampleStore = PtSampleStore(directory, on_corrupt, config,
                                                                       data_format_version)
        if data_format_version == 1 and len(store):
            first = store.path(0)
            try:
                sample = torch.load(first, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                sample = None  # unreadable: the corrupt-file policy deals with it when it is loaded
            if sample is not None:
                check_layout(sample, str(first), 1)
    elif fmt == "safetensors":
        store = SafetensorsSampleStore(directory, on_corrupt, config)
    else:
        raise UserError(f"{where}: unknown format {fmt!r} (expected 'pt' or 'safetensors')")
    if len(store) == 0:
        raise UserError(f"{directory}: no samples found; run `speculators datagen` first")
    return store


# ---------------------------------------------------------------- writing


def write_pt_sample(
    directory: str | os.PathLike, index: int, sample: dict[str, Any], storage: HiddenStatesDtype | None = None
) -> Path:
    """Write one version-1 sample atomically (temp name, then rename).

    ``storage`` ``"bf16"``/``"fp8"`` encodes the hidden states so (`speculators.data.hs_quant`);
    None writes them as given (with their ``hidden_states_scale`` when the sample has one)."""
    path = Path(directory) / pt_file_name(index)
    if storage is not None:
        hidden = encode_hidden_states(list(sample["hidden_states"]), storage)
    else:
        hidden = {"hidden_states": [h.contiguous() for h in sample["hidden_states"]]}
        if SCALE_KEY in sample:
            hidden[SCALE_KEY] = [s.contiguous() for s in sample[SCALE_KEY]]
    payload = {
        "input_ids": sample["input_ids"].long().contiguous(),
        **hidden,
        "loss_mask": sample["loss_mask"].long().contiguous(),
    }
    atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))
    return path


def finished_pt_indices(directory: str | os.PathLike) -> set[int]:
    """Sample indices that already have a complete ``data_<i>.pt`` (temp files never match)."""
    directory = Path(directory)
    if not directory.is_dir():
        return set()
    out = set()
    for name in os.listdir(directory):
        m = _PT_NAME.match(name)
        if m:
            out.add(int(m.group(1)))
    return out


def check_new_output(src: Path, dst: Path, empty: bool = True) -> None:
    """A converter writes a new directory: never --data-path itself, and (``empty``) none with files in it."""
    if src.resolve() == dst.resolve():
        raise UserError("--output-dir must differ from --data-path (convert-data writes a new directory)")
    if empty and dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"--output-dir {dst} exists and is not empty; choose a new directory")


def convert_pt_to_safetensors(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    shard_tokens: int = 1 << 20,
    on_corrupt: OnCorrupt = "skip",
    data_format_version: int = DATA_FORMAT_VERSION,
) -> dict[str, Any]:
    """Copy a ``pt`` dataset (data format version 1, or 0) into the sharded safetensors layout;
    returns the new data_config (flat view).

    A shard closes once it holds at least ``shard_tokens`` tokens. Corrupt source
    files are skipped with a warning (or raise, per ``on_corrupt``); either way the
    converted dataset only holds good samples.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    check_new_output(src, dst, empty=False)  # datagen converts into its own output directory
    store = open_sample_store(src, on_corrupt="raise", data_format_version=data_format_version)
    if not isinstance(store, PtSampleStore):
        raise UserError(f"{src / DATA_CONFIG_NAME}: format is {store.config.get('format')!r}, expected 'pt'")
    config = dict(store.config)
    if len(store) == 0:
        raise UserError(f"{src}: no data_<i>.pt files to convert")
    (dst / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, Any]] = []
    buf: list[tuple[int, dict[str, Any]]] = []
    buf_tokens = 0

    def flush() -> None:
        nonlocal buf, buf_tokens
        if not buf:
            return
        name = f"{SHARD_DIR}/shard_{len(shards):05d}.safetensors"
        lengths = [int(s["input_ids"].shape[0]) for _, s in buf]
        offsets = torch.zeros(len(buf) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths).cumsum(0)
        tensors = {
            "input_ids": torch.cat([s["input_ids"] for _, s in buf]).long(),
            "loss_mask": torch.cat([s["loss_mask"] for _, s in buf]).to(torch.uint8),
            "hidden_states": _stack_layers([s["hidden_states"] for _, s in buf], store.schema.num_layers),
            "offsets": offsets,
            "sample_index": torch.tensor([idx for idx, _ in buf], dtype=torch.long),
        }
        if store.storage == "fp8":  # copied as stored: fp8 values and their per-row scales
            tensors[SCALE_KEY] = _stack_layers([s[SCALE_KEY] for _, s in buf], store.schema.num_layers)
        atomic_write_bytes(dst / name, lambda tmp: save_file(tensors, tmp))
        shards.append({"file": name, "sample_index": [idx for idx, _ in buf], "lengths": lengths})
        buf, buf_tokens = [], 0

    store.decode = False  # fp8 stays fp8 in the shards (no second rounding)
    skipped: list[int] = []
    for index, sample in readable_samples(store, on_corrupt, skipped):
        buf.append((index, sample))
        buf_tokens += int(sample["input_ids"].shape[0])
        if buf_tokens >= shard_tokens:
            flush()
    flush()

    new_config = dict(config)
    new_config.pop("lengths", None)
    new_config["format"] = "safetensors"
    new_config["converted_from"] = str(src)
    new_config["skipped_corrupt"] = skipped
    new_config["shards"] = shards
    if data_format_version == 0:  # the shards hold version-1 samples now; say how many layers
        new_config.pop("inferred_from", None)
        new_config.setdefault("layer_ids", None)
        new_config["num_layers"] = store.schema.num_layers
    dc.write(dst / DATA_CONFIG_NAME, new_config)
    return new_config


def _stack_layers(per_sample: list[list[torch.Tensor]], num_layers: int) -> torch.Tensor:
    """``[K, N, ...]``: layer k of every sample, concatenated along tokens (fp8 concatenated as bytes,
    which torch.cat does not take on every build)."""
    first = per_sample[0][0]
    if first.dtype == FP8:
        raw = [[t.view(torch.uint8) for t in layers] for layers in per_sample]
        return _stack_layers(raw, num_layers).view(FP8)
    return torch.stack([torch.cat([layers[k] for layers in per_sample]) for k in range(num_layers)])


def copy_samples_to_pt(store: SampleStore, dst: Path, on_corrupt: OnCorrupt) -> tuple[dict[str, int], list[int]]:
    """Write every readable sample of `store` as `dst/data_<i>.pt`; their token counts by index
    (data_config.json's `lengths`) and the indices skipped as corrupt."""
    dst.mkdir(parents=True, exist_ok=True)
    lengths: dict[str, int] = {}
    skipped: list[int] = []
    for index, sample in readable_samples(store, on_corrupt, skipped):
        write_pt_sample(dst, index, sample)
        lengths[str(index)] = int(sample["input_ids"].shape[0])
    return lengths, skipped


def convert_v0_to_pt(src: str | os.PathLike, dst: str | os.PathLike, on_corrupt: OnCorrupt = "skip") -> dict[str, Any]:
    """Rewrite a data-format-version-0 directory as version 1 (what datagen writes today)."""
    src, dst = Path(src), Path(dst)
    check_new_output(src, dst)
    store = open_sample_store(src, on_corrupt="raise", data_format_version=0)
    lengths, skipped = copy_samples_to_pt(store, dst, on_corrupt)
    config = {k: v for k, v in store.config.items() if k not in ("inferred_from",)}
    config.update({"version": DATA_FORMAT_VERSION, "format": "pt", "converted_from": str(src),
                   "skipped_corrupt": skipped, "complete": True, "num_samples": len(lengths), "lengths": lengths})
    config.setdefault("layer_ids", None)
    config["num_layers"] = store.schema.num_layers
    dc.write(dst / DATA_CONFIG_NAME, config)
    return config

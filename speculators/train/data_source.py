"""Where training samples come from: the pluggable sample-store builder.

`build_sample_store(cfg, verifier)` returns a `speculators.data.sample_store.SampleStore`
whose data was checked against the verifier's dimensions (the one place that check runs
for training).  Offline training reads the datagen output in
`--data-path`.  Online/hybrid mode (`--vllm-endpoint`) hands the TrainConfig itself (its
online fields are typed settings like the rest) to
`speculators.online.cli_args.build_online_store`.
Other sources can be added with `register_source(name, builder)` and `--data-source name`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from speculators.data.sample_store import SampleStore
from speculators.errors import UserError

Builder = Callable[[Any], SampleStore]
_SOURCES: dict[str, Builder] = {}


def register_source(name: str, builder: Builder) -> None:
    _SOURCES[name] = builder


def _disk_store(cfg) -> SampleStore:
    from speculators.data.formats import open_sample_store

    if not cfg.data_path:
        raise UserError("--data-path is required for offline training (the `speculators datagen` output directory)")
    return open_sample_store(cfg.data_path, on_corrupt=cfg.on_corrupt,
                             data_format_version=getattr(cfg, "data_format_version", 1))


def _online_store(cfg) -> SampleStore:
    if getattr(cfg, "data_format_version", 1) != 1:
        raise UserError("--data-format-version 0 applies to offline data (--data-path); online training reads "
                        "and caches version 1 (drop the flag or --vllm-endpoint)")
    try:
        module = importlib.import_module("speculators.online.cli_args")
        build = module.build_online_store
    except (ImportError, AttributeError) as exc:
        raise UserError(
            "online training (--vllm-endpoint/--hidden-states-path) is not available in this install "
            f"({exc}); train offline with --data-path"
        ) from exc
    return build(cfg)


register_source("disk", _disk_store)
register_source("online", _online_store)


def resolve_source_name(cfg) -> str:
    if cfg.data_source:
        return cfg.data_source
    if cfg.vllm_endpoint:
        return "online"
    return "disk"


def build_sample_store(cfg, verifier: Any | None = None) -> SampleStore:
    """The training store named by `cfg`; with ``verifier`` (its text config) the data's hidden size,
    layer count and layer ids are checked against it before anything is trained."""
    name = resolve_source_name(cfg)
    if name not in _SOURCES:
        raise UserError(f"--data-source {name!r}: unknown; choose one of {', '.join(sorted(_SOURCES))}")
    store = _SOURCES[name](cfg)
    if not isinstance(store, SampleStore):
        raise TypeError(f"the {name} data source built a {type(store).__name__}, not a SampleStore")
    if len(store) == 0:
        raise UserError(f"the {name} data source has no samples; check --data-path")
    if verifier is not None:
        store.check_verifier(hidden_size=verifier.hidden_size, num_hidden_layers=verifier.num_hidden_layers)
    return store

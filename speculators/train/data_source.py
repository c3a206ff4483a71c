"""Where training samples come from: the pluggable sample-store builder.

`build_sample_store(cfg)` returns any object with `__len__` and `load(i)` (the sample
store protocol in docs/ARCHITECTURE.md).  Offline training reads the datagen output in
`--data-path`.  Online/hybrid mode (`--vllm-endpoint`) hands the TrainConfig itself (its
online fields are typed settings like the rest) to
`speculators.online.cli_args.build_online_store`.
Other sources can be added with `register_source(name, builder)` and `--data-source name`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from speculators.errors import UserError

Builder = Callable[[Any], Any]
_SOURCES: dict[str, Builder] = {}


def register_source(name: str, builder: Builder) -> None:
    _SOURCES[name] = builder


def _disk_store(cfg) -> Any:
    from speculators.data.formats import open_sample_store

    if not cfg.data_path:
        raise UserError("--data-path is required for offline training (the `speculators datagen` output directory)")
    return open_sample_store(cfg.data_path, on_corrupt=cfg.on_corrupt,
                             data_format_version=getattr(cfg, "data_format_version", 1))


def _online_store(cfg) -> Any:
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


def build_sample_store(cfg) -> Any:
    name = resolve_source_name(cfg)
    if name not in _SOURCES:
        raise UserError(f"--data-source {name!r}: unknown; choose one of {', '.join(sorted(_SOURCES))}")
    store = _SOURCES[name](cfg)
    if len(store) == 0:
        raise UserError(f"the {name} data source has no samples; check --data-path")
    return store

"""The online-training flags of `speculators train` and the store they build.

Wiring (in the train command)::

    from speculators.online.cli_args import add_online_args, build_online_store, online_enabled
    add_online_args(parser)                       # in register()
    store = build_online_store(args) if online_enabled(args) else open_sample_store(args.data_path)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from speculators.errors import UserError


def add_online_args(parser: argparse.ArgumentParser) -> None:
    """The online flags, derived from their settings in `speculators.config.train`."""
    from speculators.config.base import add_arguments
    from speculators.config.train import ONLINE_FIELDS, TrainConfig

    add_arguments(parser, TrainConfig, ONLINE_FIELDS)


def _values(args: Any) -> dict[str, Any]:
    """The settings of parsed flags (argparse.Namespace) or of a TrainConfig, as one dict."""
    if isinstance(args, argparse.Namespace):
        return vars(args)
    model_fields = getattr(type(args), "model_fields", None)
    if model_fields is None:
        raise TypeError(f"online options come from an argparse.Namespace or a TrainConfig, not {type(args).__name__}")
    return {name: getattr(args, name) for name in model_fields}


@dataclass(frozen=True)
class OnlineOptions:
    """The online-training options, read once from parsed flags or a TrainConfig (`from_args`).

    A Namespace built only by `add_online_args` (tests, other commands) lacks the verifier and
    data flags; every absent online flag takes its TrainConfig default, so the two sources
    cannot drift apart."""

    endpoints: tuple[str, ...]
    prepared_data: str | None  # --prepared-data, else --data-path
    verifier: str | None  # --verifier / --verifier-name-or-path
    on_missing: Literal["generate", "skip", "raise"]
    on_generate: Literal["delete", "cache"]
    hidden_states_path: str | None
    prefetch: int
    vllm_workers: int
    vllm_model: str | None
    vllm_timeout: float
    vllm_max_wait: float
    vllm_layer_ids: tuple[int, ...] | None
    hidden_states_dtype: Literal["bf16", "fp8"] | None
    vllm_api_key: str | None  # default: $VLLM_API_KEY (launch.api_key_from_env)

    @classmethod
    def from_args(cls, args: Any) -> OnlineOptions:
        from speculators.config.train import ONLINE_FIELDS, TrainConfig
        from speculators.online.endpoints import split_endpoints

        values = _values(args)
        own = {f.name for f in fields(cls)} - {"prepared_data"}  # read below, with its fallback
        kw = {}
        for name in ONLINE_FIELDS:
            if name in own:
                kw[name] = values[name] if name in values else TrainConfig.model_fields[name].get_default()
        ids = kw["vllm_layer_ids"]
        kw["vllm_layer_ids"] = tuple(int(i) for i in ids) if ids else None
        return cls(
            endpoints=tuple(split_endpoints(values.get("vllm_endpoint"))),
            prepared_data=values.get("prepared_data") or values.get("data_path"),
            verifier=values.get("verifier") or values.get("verifier_name_or_path"),
            vllm_api_key=values.get("vllm_api_key"),
            **kw,
        )


def online_enabled(args: Any) -> bool:
    return bool(_values(args).get("vllm_endpoint"))


def _prepared_path(opts: OnlineOptions) -> str:
    path = opts.prepared_data
    if not path:
        raise UserError("online training needs --prepared-data DIR (the output of `speculators prepare-data`)")
    if (Path(path) / "data_config.json").exists() and not (Path(path) / "dataset_info.json").exists():
        raise UserError(
            f"{path} holds hidden states, not a prepared dataset; pass --prepared-data DIR "
            "(prepare-data --output) and --hidden-states-path for cached samples"
        )
    return str(path)


def build_online_store(args: Any, **overrides: Any):
    """An `OnlineSampleStore` from a TrainConfig or parsed train args (`add_online_args`),
    read once into `OnlineOptions`."""
    from speculators.online.store import OnlineConfig, OnlineSampleStore, PreparedRows
    from speculators.vllm.launch import api_key_from_env

    opts = OnlineOptions.from_args(args)
    prepared = _prepared_path(opts)
    verifier = opts.verifier
    layer_ids = list(opts.vllm_layer_ids) if opts.vllm_layer_ids else None
    hidden_size = num_layers = None
    if verifier:
        from speculators.layers import num_hidden_layers_of, resolve_layer_ids, text_config_of

        text = text_config_of(verifier)  # read once: layer count and width
        num_layers = num_hidden_layers_of(verifier, text_config=text)
        hidden_size = getattr(text, "hidden_size", None)
        layer_ids = resolve_layer_ids(layer_ids, num_layers, flag="--vllm-layer-ids") if layer_ids else None

    endpoints = list(opts.endpoints)
    config = OnlineConfig(
        endpoint=",".join(endpoints) or None,
        hidden_states_path=opts.hidden_states_path,
        on_missing=opts.on_missing,
        on_generate=opts.on_generate,
        prefetch_depth=opts.prefetch,
        workers=opts.vllm_workers,
        model=opts.vllm_model,
        request_timeout_s=opts.vllm_timeout,
        max_wait_s=opts.vllm_max_wait,
        layer_ids=layer_ids,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        verifier=verifier,
        data=prepared,
        api_key=api_key_from_env(opts.vllm_api_key),
        store_dtype=opts.hidden_states_dtype,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    client = None
    if len(endpoints) > 1:
        from speculators.online.endpoints import MultiEndpointClient
        from speculators.vllm.client import ClientConfig
        from speculators.vllm.retry import RetryPolicy

        client = MultiEndpointClient(ClientConfig(
            endpoint=endpoints[0], model=config.model, request_timeout_s=config.request_timeout_s,
            retry=RetryPolicy(max_wait_s=config.max_wait_s),
            num_layers=len(config.layer_ids) if config.layer_ids else None,
            layer_ids=list(config.layer_ids) if config.layer_ids else None, api_key=config.api_key), endpoints)
    store = OnlineSampleStore(PreparedRows.from_path(prepared), config, client=client)
    if client is not None and store.online.layer_ids:
        store.set_layer_ids(store.online.layer_ids)  # ids adopted from the cache reach every endpoint
    if client is not None and store.online.on_missing == "generate" and len(store.rows):
        # every server answers once before training: same model, layers and shape, or refused
        client.check_agreement(store.rows.get(0)[0][:8])
    if store.online.layer_ids is None and store.online.on_missing == "generate" and len(store.rows):
        # Neither --vllm-layer-ids nor a cache says which layers: ask the server (launch-vllm
        # records them next to the files it writes), so a custom-layer server is trained on
        # and recorded as such instead of being assumed to export the defaults.
        probed = store.client.probe_layer_ids(store.rows.get(0)[0][:8])
        if probed is not None:
            if num_layers is not None:
                from speculators.layers import check_layer_ids

                check_layer_ids(probed, num_layers, flag="the server's layer ids")
            store.set_layer_ids(probed)
    if store.online.layer_ids is None and num_layers is not None:
        # No record (a server not started by launch-vllm): launch-vllm's defaults.
        from speculators.layers import default_layer_ids

        store.set_layer_ids(default_layer_ids(num_layers))
    return store

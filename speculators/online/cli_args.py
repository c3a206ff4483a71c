"""The online-training flags of `speculators train` and the store they build.

Wiring (in the train command)::

    from speculators.online.cli_args import add_online_args, build_online_store, online_enabled
    add_online_args(parser)                       # in register()
    store = build_online_store(args) if online_enabled(args) else open_sample_store(args.data_path)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from speculators.errors import UserError


def add_online_args(parser: argparse.ArgumentParser) -> None:
    """The online flags, derived from their settings in `speculators.config.train`."""
    from speculators.config.base import add_arguments
    from speculators.config.train import ONLINE_FIELDS, TrainConfig

    add_arguments(parser, TrainConfig, ONLINE_FIELDS)


def online_enabled(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "vllm_endpoint", None))


def _prepared_path(args: argparse.Namespace) -> str:
    path = getattr(args, "prepared_data", None) or getattr(args, "data_path", None)
    if not path:
        raise UserError("online training needs --prepared-data DIR (the output of `speculators prepare-data`)")
    if (Path(path) / "data_config.json").exists() and not (Path(path) / "dataset_info.json").exists():
        raise UserError(
            f"{path} holds hidden states, not a prepared dataset; pass --prepared-data DIR "
            "(prepare-data --output) and --hidden-states-path for cached samples"
        )
    return str(path)


def build_online_store(args: argparse.Namespace, **overrides: Any):
    """An `OnlineSampleStore` from a TrainConfig (or parsed train args, see `add_online_args`)."""
    from speculators.online.store import OnlineConfig, OnlineSampleStore, PreparedRows
    from speculators.vllm.launch import api_key_from_env

    prepared = _prepared_path(args)
    verifier = getattr(args, "verifier", None) or getattr(args, "verifier_name_or_path", None)
    layer_ids = args.vllm_layer_ids
    hidden_size = num_layers = None
    if verifier:
        from speculators.layers import num_hidden_layers_of, resolve_layer_ids, text_config_of

        text = text_config_of(verifier)  # read once: layer count and width
        num_layers = num_hidden_layers_of(verifier, text_config=text)
        hidden_size = getattr(text, "hidden_size", None)
        layer_ids = resolve_layer_ids(layer_ids, num_layers, flag="--vllm-layer-ids") if layer_ids else None
    from speculators.online.endpoints import split_endpoints

    endpoints = split_endpoints(args.vllm_endpoint)
    config = OnlineConfig(
        endpoint=",".join(endpoints) or None,
        hidden_states_path=args.hidden_states_path,
        on_missing=args.on_missing,
        on_generate=args.on_generate,
        prefetch_depth=args.prefetch,
        workers=args.vllm_workers,
        model=args.vllm_model,
        request_timeout_s=args.vllm_timeout,
        max_wait_s=args.vllm_max_wait,
        layer_ids=layer_ids,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        verifier=verifier,
        data=prepared,
        api_key=api_key_from_env(getattr(args, "vllm_api_key", None)),
        store_dtype=getattr(args, "hidden_states_dtype", None),
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

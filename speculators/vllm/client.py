"""HTTP client for a vLLM server launched by `speculators launch-vllm`.

Protocol (vLLM's OpenAI-compatible server with the ``extract_hidden_states``
method and ``ExampleHiddenStatesConnector``):

* ``GET /v1/models`` -> ``{"data": [{"id": MODEL}, ...]}``
* ``POST /v1/completions`` with ``{"model", "prompt": [token ids], "max_tokens": 1,
  "return_token_ids": true}`` -> ``choices[0].prompt_token_ids`` (must equal the
  prompt) and ``kv_transfer_params.hidden_states_path`` (a safetensors file, see
  `speculators.vllm.hs_files`).

Token ids go in directly, so the server never re-tokenizes and the hidden states
line up with the prepared dataset row by row.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from speculators.errors import UserError
from speculators.vllm.hs_files import (
    check_payload,
    read_hidden_states_file,
    read_server_info,
    remove_hidden_states_file,
)
from speculators.vllm.retry import (
    InvalidResponseError,
    RetryPolicy,
    TransientServerError,
    call_with_retries,
)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


def normalize_endpoint(url: str) -> str:
    """``http://h:8000``, ``http://h:8000/`` and ``http://h:8000/v1`` all mean the same server."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def build_completion_request(model: str, token_ids: Sequence[int]) -> dict[str, Any]:
    """The body that makes vLLM run one prefill over ``token_ids`` and save its hidden states."""
    return {
        "model": model,
        "prompt": [int(t) for t in token_ids],
        "max_tokens": 1,
        "temperature": 0.0,
        "return_token_ids": True,
    }


def parse_completion_response(body: Any, token_ids: Sequence[int]) -> str:
    """Return the hidden-state file path from a completion response, checking the prompt echo."""
    if not isinstance(body, dict):
        raise InvalidResponseError(f"completion response is not a JSON object: {str(body)[:200]}")
    choices = body.get("choices") or []
    echoed = choices[0].get("prompt_token_ids") if choices and isinstance(choices[0], dict) else None
    if echoed is None:
        echoed = body.get("prompt_token_ids")
    if echoed is None:
        raise InvalidResponseError(
            "completion response lacks prompt_token_ids: the server must be vLLM with return_token_ids support"
        )
    if list(echoed) != list(token_ids):
        raise InvalidResponseError(
            f"server tokenized the prompt differently ({len(echoed)} tokens back for {len(token_ids)} sent)"
        )
    params = body.get("kv_transfer_params")
    if not isinstance(params, dict) or not params.get("hidden_states_path"):
        raise InvalidResponseError(
            "completion response lacks kv_transfer_params.hidden_states_path: start the server with "
            "`speculators launch-vllm` (extract_hidden_states + ExampleHiddenStatesConnector)"
        )
    return str(params["hidden_states_path"])


@dataclass
class ClientConfig:
    endpoint: str
    model: str | None = None
    request_timeout_s: float = 120.0
    lock_timeout_s: float = 60.0
    retry: RetryPolicy = RetryPolicy()
    num_layers: int | None = None  # expected K; checked on every file
    layer_ids: list[int] | None = None  # expected ids; checked against the launch-vllm record
    api_key: str | None = None  # sent as a bearer token (vLLM --api-key / $VLLM_API_KEY)


class HiddenStatesClient:
    """Fetch hidden states for token-id sequences; thread-safe (one session per thread)."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.base = normalize_endpoint(config.endpoint)
        self._local = threading.local()
        self._model: str | None = config.model
        self._model_checked = False
        self._server_checked = False
        self.server_layer_ids: list[int] | None = None  # from the launch-vllm record, once seen
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_local", None)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------------
    def _session(self):
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            if self.config.api_key:
                s.headers["Authorization"] = f"Bearer {self.config.api_key}"
        return s

    def _hint(self) -> str:
        return (
            f"Check that the vLLM server at --vllm-endpoint {self.base} is up "
            "(`speculators launch-vllm MODEL -- --port PORT`) and reachable"
        )

    def _http(self, method: str, path: str, json_body: Any = None) -> Any:
        import requests

        url = self.base + path
        try:
            resp = self._session().request(method, url, json=json_body, timeout=self.config.request_timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientServerError(f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code in RETRYABLE_STATUS:
            raise TransientServerError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.status_code != 200:
            raise InvalidResponseError(f"{method} {url} -> HTTP {resp.status_code}: {resp.text[:500]}")
        try:
            return resp.json()
        except ValueError as exc:
            raise InvalidResponseError(f"{method} {url} returned non-JSON: {resp.text[:200]}") from exc

    def _retrying(self, method: str, path: str, fn):
        return call_with_retries(fn, self.config.retry, f"{method} {self.base}{path}", self._hint())

    # -- API ------------------------------------------------------------------------
    def model(self) -> str:
        """The served model id (checked against an explicit ``--vllm-model`` once)."""
        with self._lock:
            if self._model_checked:
                return self._model  # type: ignore[return-value]
            body = self._retrying("GET", "/v1/models", lambda: self._http("GET", "/v1/models"))
            ids = [m.get("id") for m in (body.get("data") or []) if isinstance(m, dict)]
            if not ids:
                raise InvalidResponseError(f"GET {self.base}/v1/models lists no model")
            if self._model is not None and self._model not in ids:
                raise InvalidResponseError(
                    f"the server at {self.base} serves {ids}, not the requested model {self._model!r}"
                )
            self._model = self._model or ids[0]
            self._model_checked = True
            return self._model

    def check_server_layers(self, path: str) -> None:
        """Compare the layer ids the server exports (launch-vllm's record next to ``path``)
        with the expected ones, by value; once per client."""
        if self._server_checked:
            return
        info = read_server_info(path)
        self._server_checked = True
        if info is None or "layer_ids" not in info:
            return  # not started by launch-vllm: only the count is checked (check_payload)
        theirs = [int(i) for i in info["layer_ids"]]
        self.server_layer_ids = theirs
        if self.config.layer_ids is not None and theirs != [int(i) for i in self.config.layer_ids]:
            raise UserError(
                f"the vLLM server at {self.base} exports layers {theirs} (launch-vllm --target-layer-ids) but "
                f"training expects {list(self.config.layer_ids)}; pass --vllm-layer-ids "
                f"{' '.join(map(str, theirs))} to train, or relaunch the server with the ids you want"
            )

    def probe_layer_ids(self, token_ids: Sequence[int]) -> list[int] | None:
        """One request to learn the layer ids a launch-vllm server exports (None: no record)."""
        self.fetch(token_ids)
        return list(self.server_layer_ids) if self.server_layer_ids else None

    def request_path(self, token_ids: Sequence[int]) -> str:
        """One completion request; the path of the file vLLM writes."""
        body = build_completion_request(self.model(), token_ids)
        return parse_completion_response(self._http("POST", "/v1/completions", body), token_ids)

    def fetch(self, token_ids: Sequence[int], keep_file: bool = False) -> torch.Tensor:
        """Hidden states ``[L, K, H]`` for ``token_ids``, retried within the policy.

        The server's file is removed after reading unless ``keep_file``.
        """
        token_ids = [int(t) for t in token_ids]
        self.model()
        return self._retrying("POST", "/v1/completions", lambda: self.fetch_once(token_ids, keep_file))

    def fetch_once(self, token_ids: Sequence[int], keep_file: bool = False) -> torch.Tensor:
        """One attempt of `fetch` (a server failure raises `TransientServerError`; the caller
        decides whether to retry, here or on another server)."""
        token_ids = [int(t) for t in token_ids]
        path = self.request_path(token_ids)
        payload = read_hidden_states_file(path, self.config.lock_timeout_s)
        hs = check_payload(payload, token_ids, self.config.num_layers, path)
        self.check_server_layers(path)
        if not keep_file:
            remove_hidden_states_file(path)
        return hs

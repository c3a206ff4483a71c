"""Several hidden-state servers behind one client: least-loaded choice, dead-server failover.

`choose` is the policy as a pure function: among the endpoints not marked dead, the one with
the fewest requests in flight (ties: fewest served so far, then the first listed).
`EndpointPool` keeps that state for concurrent requests: a request that fails on an endpoint
for a server reason (connection refused or reset, timeout, 5xx) marks it dead for a back-off
(`RetryPolicy.backoff` of its consecutive failures) and is sent again to another. When every
endpoint is dead the request waits for the first to come back, within ``max_wait_s`` counted
from the request's start, then fails naming every endpoint.

`MultiEndpointClient` offers what `OnlineSampleStore` uses of `HiddenStatesClient`
(``fetch``, ``probe_layer_ids``, ``config``, ``server_layer_ids``) over one
`HiddenStatesClient` per endpoint; `check_agreement` refuses endpoints whose model, layer ids
or hidden-state shape differ from the first's before anything is trained.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from speculators.errors import UserError
from speculators.vllm.client import ClientConfig, HiddenStatesClient, normalize_endpoint
from speculators.vllm.retry import RetryPolicy, ServerUnavailableError, TransientServerError

logger = logging.getLogger(__name__)


@dataclass
class EndpointState:
    in_flight: int = 0
    served: int = 0  # requests finished successfully
    failures: int = 0  # consecutive failures (reset by a success)
    dead_until: float = 0.0  # clock time before which it is not chosen


def choose(states: Sequence[EndpointState], now: float) -> int | None:
    """The endpoint for the next request, or None when every one is dead at `now`."""
    best: int | None = None
    for i, s in enumerate(states):
        if s.dead_until > now:
            continue
        if best is None or (s.in_flight, s.served) < (states[best].in_flight, states[best].served):
            best = i
    return best


class EndpointPool:
    """Thread-safe `choose` with in-flight counting and back-off for failing endpoints."""

    def __init__(self, n: int, backoff: RetryPolicy, clock: Callable[[], float] = time.monotonic):
        self.states = [EndpointState() for _ in range(n)]
        self.backoff = backoff
        self.clock = clock
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def acquire(self) -> int | None:
        with self._lock:
            i = choose(self.states, self.clock())
            if i is not None:
                self.states[i].in_flight += 1
            return i

    def release(self, i: int, ok: bool | None) -> float:
        """End a request on `i`: served (True), failed for a server reason (False: `i` is marked
        dead) or neither (None). Returns the seconds `i` stays dead."""
        with self._lock:
            s = self.states[i]
            s.in_flight -= 1
            if ok is None:
                return 0.0
            if ok:
                s.served += 1
                s.failures = 0
                return 0.0
            s.failures += 1
            delay = self.backoff.backoff(s.failures)
            s.dead_until = max(s.dead_until, self.clock() + delay)
            return delay

    def seconds_until_live(self) -> float:
        with self._lock:
            now = self.clock()
            return max(0.0, min(s.dead_until for s in self.states) - now)


def split_endpoints(value: str | Sequence[str] | None) -> list[str]:
    """``"a,b"``, ``["a", "b,c"]`` -> the endpoint URLs in order (blanks dropped)."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


class MultiEndpointClient:
    """One `HiddenStatesClient` per endpoint (sharing one `ClientConfig`), requests spread by load."""

    def __init__(self, config: ClientConfig, endpoints: Sequence[str],
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        bases = [normalize_endpoint(u) for u in endpoints]
        dup = sorted({b for b in bases if bases.count(b) > 1})
        if dup:
            raise UserError(f"--vllm-endpoint: {', '.join(dup)} given more than once")
        self.config = config
        self.clients = []
        for url in bases:
            client = HiddenStatesClient(dataclasses.replace(config, endpoint=url))
            client.config = config  # one config: layer ids set later reach every endpoint
            self.clients.append(client)
        self.bases = bases
        self.pool = EndpointPool(len(bases), RetryPolicy(initial_backoff_s=config.retry.initial_backoff_s,
                                                         max_backoff_s=config.retry.max_backoff_s,
                                                         multiplier=config.retry.multiplier), clock)
        self.sleep = sleep
        self.clock = clock
        self._agreed: list[int] | None = None
        self._checked = False

    @property
    def server_layer_ids(self) -> list[int] | None:
        return next((c.server_layer_ids for c in self.clients if c.server_layer_ids), None)

    def served(self) -> dict[str, int]:
        """Requests each endpoint answered (this process)."""
        return {b: s.served for b, s in zip(self.bases, self.pool.states)}

    def check_agreement(self, token_ids: Sequence[int]) -> list[int] | None:
        """One request to every endpoint (each waited for up to ``max_wait_s``, as a single server
        is): they must serve the same model, export the same layers and return the same shape."""
        first: tuple[str, Any, Any, str] | None = None
        for client in self.clients:
            model = client.model()
            hs = client.fetch(token_ids)  # also checks the layers against config.layer_ids
            seen = (model, client.server_layer_ids, tuple(hs.shape[1:]), client.base)
            if first is None:
                first = seen
                continue
            for what, mine, theirs in (("serves model", seen[0], first[0]),
                                       ("exports layers", seen[1], first[1]),
                                       ("returns hidden states of shape [tokens, layers, hidden]",
                                        seen[2], first[2])):
                if mine != theirs:
                    raise UserError(
                        f"--vllm-endpoint {client.base} {what} {mine!r} but {first[3]} {what.split(' ')[0]} "
                        f"{theirs!r}: every endpoint must serve the same verifier with the same "
                        "launch-vllm --target-layer-ids")
        self._checked = True
        self._agreed = list(first[1]) if first and first[1] else None
        return self._agreed

    def probe_layer_ids(self, token_ids: Sequence[int]) -> list[int] | None:
        if not self._checked:
            self.check_agreement(token_ids)
        return self._agreed

    def fetch(self, token_ids: Sequence[int], keep_file: bool = False) -> torch.Tensor:
        """Hidden states ``[L, K, H]`` from the least-loaded live endpoint; a server failure
        moves the request to another endpoint."""
        token_ids = [int(t) for t in token_ids]
        start = self.clock()
        errors: dict[str, str] = {}
        while True:
            i = self.pool.acquire()
            if i is None:
                wait = self.pool.seconds_until_live()
                waited = self.clock() - start
                if waited + wait > self.config.retry.max_wait_s:
                    said = "; ".join(f"{b}: {errors.get(b, 'marked dead earlier')}" for b in self.bases)
                    raise ServerUnavailableError(
                        f"no vLLM server answered within the bounded wait {self.config.retry.max_wait_s:g}s "
                        f"(waited {waited:.1f}s) among --vllm-endpoint {', '.join(self.bases)}; last errors: "
                        f"{said}. Check that the servers (`speculators launch-vllm`) are up and reachable")
                self.sleep(max(wait, 0.01))
                continue
            client = self.clients[i]
            try:
                hs = client.fetch_once(token_ids, keep_file)
            except (TransientServerError, ServerUnavailableError) as exc:
                dead_for = self.pool.release(i, ok=False)
                errors[client.base] = str(exc)[:300]
                logger.warning("vLLM server %s failed (%s); marked dead for %.1fs, the request goes to "
                               "another endpoint", client.base, str(exc)[:200], dead_for)
                continue
            except BaseException:
                self.pool.release(i, ok=None)  # the server answered; the answer was wrong: not a dead server
                raise
            self.pool.release(i, ok=True)
            return hs


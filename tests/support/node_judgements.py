"""Each judgement a node of a multi-node stage makes on another node's heartbeat
(worker.multinode.JoinerStore.gone), recorded, so an outage test waits for the judgement it is
about instead of sleeping for it: a stale beat spared right after the database came back, a
fresh one judged once the grace (SPEC_NODE_STALE_S) is over."""

from __future__ import annotations

import time

from runstore import nodes
from worker import multinode


class Judged:
    """Installs the recorder (monkeypatch); `calls`: (when, whether the beat was stale, when
    the store last came back from an outage, the verdict), all times time.monotonic()."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[float, bool, float, bool]] = []
        real = multinode.JoinerStore.gone

        def gone(store, row, stale_after_s):
            verdict = real(store, row, stale_after_s)
            self.calls.append((time.monotonic(), nodes.is_stale(row, stale_after_s), store.back_at, verdict))
            return verdict

        monkeypatch.setattr(multinode.JoinerStore, "gone", gone)

    def any_since(self, t: float) -> bool:
        return any(at > t for at, *_ in self.calls)

    def _since(self, restarted: float) -> list[tuple[float, bool, float, bool]]:
        after = [c for c in self.calls if c[2] >= restarted]
        assert not any(verdict for *_, verdict in after), "a node was counted gone after the restart"
        return after

    def spared_stale(self, restarted: float) -> bool:
        """Since the database came back at `restarted`: a stale beat judged, and not counted
        as gone (the node that could not beat in the outage gets SPEC_NODE_STALE_S)."""
        return any(stale for _, stale, _, _ in self._since(restarted))

    def fresh_after_grace(self, restarted: float, stale_after_s: float) -> bool:
        """A judgement made once the grace after the restart was over, on a fresh beat."""
        return any(at - back >= stale_after_s and not stale for at, stale, back, _ in self._since(restarted))

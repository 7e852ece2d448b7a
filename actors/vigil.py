"""Noticing at once that an expert shard died, so that a step waiting on it fails now.

NCCL does not fail a collective whose peer died: the others wait, and the router's step with
them, in a host read of the device (a ragged prefill's mask, the step's load). PyTorch's watchdog
aborts eager collectives at the group's timeout (60 s by default); collectives a decode step
replays from a CUDA graph it does not watch at all, so there the wait had no end.

So every shard keeps a vigil call running for as long as it is in a group: a call that returns
when the shard leaves the group and fails the moment its process dies. A thread of the router
waits on them; when one fails it reports the shard, and the router aborts the communicators (its
own and the survivors', `actors/transport.abort_group_soon`): the waiting kernels end, the step
sees the death, and failover starts about as soon as Ray has noticed it. It costs nothing per step."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError, RayError

log = logging.getLogger(__name__)


class Vigil:
    def __init__(self, on_death: Callable[[int, int], None], poll_s: float = 0.5):
        """on_death(generation, shard index): called from the vigil's thread, once per shard death."""
        self.on_death, self.poll_s = on_death, poll_s
        self._calls: dict = {}  # vigil call -> (generation, shard index)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moray-shard-vigil", daemon=True)
        self._thread.start()

    def watch(self, generation: int, shards: list) -> None:
        """The shards of a newly formed group (`generation`); the previous group's calls end as
        their shards leave it, and are dropped here."""
        calls = {shard.vigil.remote(generation): (generation, i) for i, shard in enumerate(shards)}
        with self._lock:
            self._calls = calls

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                calls = dict(self._calls)
            if not calls:
                self._stopped.wait(self.poll_s)
                continue
            ready, _ = ray.wait(list(calls), num_returns=1, timeout=self.poll_s)
            for call in ready:
                with self._lock:
                    self._calls.pop(call, None)
                generation, index = calls[call]
                try:
                    ray.get(call)  # returned: the shard left the group, as asked
                except RayActorError:
                    if self._stopped.is_set():
                        return  # the shards are being shut down
                    self.on_death(generation, index)  # which says whether it matters (a removed shard's does not)
                except RayError as exc:  # not a death: nothing to abort for it
                    log.warning("vigil of shard %d ended with %s", index, type(exc).__name__)

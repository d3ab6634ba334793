"""Raft link faults from a file: a testing aid of the fault harness."""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import time
from typing import Any

log = logging.getLogger(__name__)


class LinkFaults:
    """Raft link faults read from a JSON file, re-read when it changes:

        {"block_to": ["HOST:PORT", ...],     drop every message to these peers
         "block_from": ["HOST:PORT", ...],   drop every message from them
         "loss": {"HOST:PORT": 0.2},         drop this share of messages to a peer
         "delay_ms": {"HOST:PORT": 50}}      hold messages to a peer this long

    Addresses are peers' Raft addresses. Blocking both ways isolates a node; one
    way makes an asymmetric partition. Used by the fault-injection harness
    (`cluster/faults.py`); a node started without `--fault-file` has none."""

    CHECK_INTERVAL_S = 0.05
    MAX_DELAYED = 100_000  # bound on held messages per peer; beyond it they are dropped

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = 0.0
        self._next_check = 0.0
        self.block_to: set[str] = set()
        self.block_from: set[str] = set()
        self.loss: dict[str, float] = {}
        self.delay_ms: dict[str, int] = {}
        # per peer address, in send order: (due time, node, message)
        self._held: dict[str, collections.deque[tuple[float, Any, Any]]] = {}

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.CHECK_INTERVAL_S
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            mtime = 0.0
        if mtime == self._mtime:
            return
        self._mtime = mtime
        rules: dict[str, Any] = {}
        if mtime:
            try:
                with open(self.path) as f:
                    rules = json.load(f)
            except (OSError, ValueError):
                log.warning("unreadable fault file %s: keeping the previous rules", self.path)
                return
        self.block_to = set(rules.get("block_to", []))
        self.block_from = set(rules.get("block_from", []))
        self.loss = {k: float(v) for k, v in rules.get("loss", {}).items()}
        self.delay_ms = {k: int(v) for k, v in rules.get("delay_ms", {}).items()}
        log.info("link faults now %s", rules)

    def outgoing(self, node: Any, message: Any) -> bool:
        """True: send it now. False: dropped, or held for later (`due`).

        Messages to one peer stay in order: while any are held for it, new ones
        queue behind them even once the delay is lifted. (Reordered AppendEntries
        make pysyncobj truncate entries a follower has already acknowledged.)"""
        self._refresh()
        addr = node.address
        if addr in self.block_to:
            return False
        if random.random() < self.loss.get(addr, 0.0):
            return False
        delay = self.delay_ms.get(addr, 0)
        queue = self._held.get(addr)
        if not delay and not queue:
            return True
        if queue is None:
            queue = self._held[addr] = collections.deque()
        if len(queue) < self.MAX_DELAYED:
            queue.append((time.monotonic() + delay / 1000, node, message))
        return False

    def blocks_from(self, node: Any) -> bool:
        self._refresh()
        return node.address in self.block_from

    def due(self) -> list[tuple[Any, Any]]:
        now = time.monotonic()
        out = []
        for queue in self._held.values():
            while queue and queue[0][0] <= now:
                _, node, message = queue.popleft()
                out.append((node, message))
        return out

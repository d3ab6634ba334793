"""The fault-injection harness: a local cluster plus participants, and every fault
the tests (and `sagactl chaos`) throw at them.

Process faults use signals on PIDs the harness started (SIGKILL, SIGSTOP/SIGCONT).
Network faults act on the Raft links through each node's fault file
(`sagalog.raft.LinkFaults`): isolate a node, split the cluster, cut one direction,
bridge two halves through one node, drop or delay a share of a link's messages.
Disk faults cut a stopped node's journal back to its last fsync (what a power loss
leaves), optionally with a torn tail. Participant faults restart a participant with
other knobs, or stop it. A monitor thread samples every node's Status, so that the
checker can verify that term and commit index never went backwards within a
process lifetime, and count leader changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cluster.testkit import crashnode
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants
from sagalog.raft import RaftTiming


@dataclass(frozen=True)
class Sample:
    """One Status answer, tagged with the process lifetime (PID) that gave it."""

    at: float
    node: str
    pid: int
    term: int
    commit_index: int
    leader: str
    role: int


class FaultHarness:
    def __init__(
        self,
        base_dir: str,
        nodes: int = 3,
        participant_args: dict[str, list[str]] | None = None,
        timing: RaftTiming | None = None,
    ) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.cluster = LocalCluster(
            os.path.join(self.base_dir, "cluster"), nodes=nodes, link_faults=True, timing=timing
        )
        self.cluster.program = crashnode.PROGRAM  # `start(node_env=...)` may set a crash point
        self.participant_args = participant_args or {}
        self.participants = TravelParticipants(
            os.path.join(self.base_dir, "participants"), extra_args=participant_args
        )
        self.nodes = list(self.cluster.specs)
        self.samples: list[Sample] = []
        self._monitor_stop = threading.Event()
        self._monitor = threading.Thread(target=self._sample_forever, daemon=True)
        self._rules: dict[str, dict] = {n: {} for n in self.nodes}
        self.paused: set[str] = set()

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, timeout_s: float = 20.0, node_env: dict[str, str] | None = None) -> None:
        """Start participants and nodes (`node_env`: extra environment for the nodes'
        first lifetime, e.g. a crash point) and wait for a leader in office."""
        self.heal()
        self.participants.start_all()
        self.participants.wait_ready(timeout_s)
        for node in self.nodes:
            self.cluster.start(node, env=node_env)
        self.cluster.wait_for_leader(timeout_s)
        self._monitor.start()

    def heal_all(self, timeout_s: float = 30.0) -> None:
        """End every fault: links, pauses, dead nodes, dead or faulty participants."""
        self.heal()
        for node in list(self.paused):
            self.resume(node)
        for node in self.nodes:
            if not self.cluster.alive(node):
                self.cluster.start(node)
        for name in self.participants.services:
            if not self.participants.alive(name):
                self.participant_up(name, list(self.participant_args.get(name, [])))
        self.cluster.wait_for_leader(timeout_s)

    def stop(self) -> None:
        self._monitor_stop.set()
        if self._monitor.is_alive():
            self._monitor.join(timeout=5)
        for node in list(self.paused):
            self.resume(node)
        self.cluster.stop_all()
        self.participants.stop_all()

    @property
    def grpc_addrs(self) -> list[str]:
        return [s.grpc_addr for s in self.cluster.specs.values()]

    def leader(self, timeout_s: float = 15.0) -> str:
        return self.cluster.wait_for_leader(timeout_s).id

    def followers(self, timeout_s: float = 15.0) -> list[str]:
        leader = self.leader(timeout_s)
        return [n for n in self.nodes if n != leader]

    def logs(self) -> str:
        return self.cluster.logs(60) + "\n" + self.participants.logs()

    # ---- process faults --------------------------------------------------------------

    def kill(self, node: str) -> None:
        self.paused.discard(node)
        self.cluster.kill(node, signal.SIGKILL)

    def restart(self, node: str) -> None:
        if self.cluster.alive(node):
            self.kill(node)
        self.cluster.start(node)

    def pause(self, node: str) -> None:
        proc = self.cluster.procs[node]
        if proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            self.paused.add(node)

    def resume(self, node: str) -> None:
        proc = self.cluster.procs[node]
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        self.paused.discard(node)

    # ---- disk faults -----------------------------------------------------------------

    def power_loss(self, nodes: Iterable[str], torn_tail: bool = False) -> None:
        """Kill the nodes, cut each journal back to its last fsync (and optionally add
        a torn entry), drop the unsynced store, and restart them."""
        nodes = list(nodes)
        for node in nodes:
            self.kill(node)
        for node in nodes:
            data_dir = self.cluster.specs[node].data_dir
            journal = os.path.join(data_dir, "journal")
            with open(journal + ".synced", "rb") as f:
                synced = int.from_bytes(f.read(8), "big")
            if 0 < synced <= os.path.getsize(journal):
                os.truncate(journal, synced)
            if torn_tail:
                with open(journal, "ab") as f:
                    f.write((1 << 16).to_bytes(4, "big") + os.urandom(100))
            # The store is derived from the journal and written without fsync:
            # a power loss may take any of it. Rebuild it from the journal.
            shutil.rmtree(os.path.join(data_dir, "db"), ignore_errors=True)
        for node in nodes:
            self.cluster.start(node)

    # ---- network faults (Raft links) -------------------------------------------------

    def _addr(self, node: str) -> str:
        return self.cluster.specs[node].raft_addr

    def _write(self) -> None:
        for node, rules in self._rules.items():
            path = self.cluster.fault_files[node]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rules, f)
            os.replace(tmp, path)

    def _block(self, src: str, dst: str) -> None:
        """Messages from src to dst are lost (one direction)."""
        self._rules[src].setdefault("block_to", []).append(self._addr(dst))
        self._rules[dst].setdefault("block_from", []).append(self._addr(src))

    def heal(self) -> None:
        self._rules = {n: {} for n in self.nodes}
        self._write()

    def partition(self, *groups: Iterable[str]) -> None:
        """Nodes in different groups cannot talk, either way. A node in no group is
        unaffected (it talks to everyone: a bridge)."""
        sets = [set(g) for g in groups]
        for i, a in enumerate(sets):
            for b in sets[i + 1 :]:
                for x in a:
                    for y in b:
                        self._block(x, y)
                        self._block(y, x)
        self._write()

    def isolate(self, node: str) -> None:
        self.partition([node], [n for n in self.nodes if n != node])

    def one_way(self, src: str, dst: str) -> None:
        self._block(src, dst)
        self._write()

    def bridge(self, middle: str) -> None:
        """Two halves that only `middle` connects."""
        others = [n for n in self.nodes if n != middle]
        half = len(others) // 2
        self.partition(others[:half], others[half:])

    def lossy(self, src: str, dst: str, loss: float) -> None:
        self._rules[src].setdefault("loss", {})[self._addr(dst)] = loss
        self._write()

    def slow(self, src: str, dst: str, delay_ms: int) -> None:
        self._rules[src].setdefault("delay_ms", {})[self._addr(dst)] = delay_ms
        self._write()

    # ---- participant faults ----------------------------------------------------------

    def participant_down(self, name: str) -> None:
        self.participants.kill(name)

    def participant_up(self, name: str, knobs: list[str] | None = None) -> None:
        """(Re)start a participant, with `knobs` replacing its fault flags (default:
        the flags it was first started with)."""
        if self.participants.alive(name):
            self.participants.kill(name)
        if knobs is None:
            knobs = list(self.participant_args.get(name, []))
        self.participants.restart(name, extra_args=knobs)
        self.participants.wait_ready(15, names=[name])

    # ---- the monitor -----------------------------------------------------------------

    def _sample_forever(self) -> None:
        while not self._monitor_stop.wait(0.1):
            for node in self.nodes:
                if node in self.paused or not self.cluster.alive(node):
                    continue
                status = self.cluster.status(node, timeout_s=0.3)
                if status is None:
                    continue
                self.samples.append(
                    Sample(
                        at=time.monotonic(),
                        node=node,
                        pid=self.cluster.procs[node].pid,
                        term=status.term,
                        commit_index=status.commit_index,
                        leader=status.leader_id,
                        role=status.role,
                    )
                )

"""gRPC health (grpc.health.v1.Health) and server reflection on every node.

What "serving" means is a pure function of the node's Raft status (`serving`);
`HealthReporter` polls it on the server's event loop and tells the stock
servicer when it changes, so Check and Watch answer from memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from saga.v1 import cluster_pb2, sagas_pb2

from sagalog.raft import RaftStatus
from sagalog.raft.status import CANDIDATE, LEADER

log = logging.getLogger("sagacluster.health")

SAGAS_SERVICE = sagas_pb2.DESCRIPTOR.services_by_name["Sagas"].full_name
CLUSTER_SERVICE = cluster_pb2.DESCRIPTOR.services_by_name["Cluster"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# A node this many entries behind its own commit index is catching up, not serving:
# its reads would wait behind the backlog. (Not 0: under load a follower is always
# a few entries behind, and a probe flapping with every batch helps no one.)
MAX_APPLY_LAG = 100
HEALTH_POLL_S = 0.1

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def serving(status: RaftStatus | None, in_office: bool) -> bool:
    """Whether the node can serve the Sagas service: Raft started, a leader known
    and not an election in progress, the node caught up with the leader once
    (pysyncobj's ready) and not far behind its commit index now; a leader must
    also be in office (its Epoch committed), or its Submits would wait."""
    if status is None or status.leader is None or status.role == CANDIDATE:
        return False
    if not status.ready or status.commit_index - status.applied_index > MAX_APPLY_LAG:
        return False
    return in_office or status.role != LEADER


class HealthReporter:
    """The stock aio HealthServicer, kept up to date from `probe` (run on the
    server's loop). Cluster serves from the moment the process listens (its Status
    answers a starting node); Sagas and the overall status ("") follow `serving`."""

    def __init__(self, probe: Callable[[], bool]) -> None:
        self.servicer = health_aio.HealthServicer()
        self._probe = probe
        self._task: asyncio.Task[None] | None = None
        self._serving: bool | None = None

    async def start(self) -> None:
        await self.servicer.set(CLUSTER_SERVICE, SERVING)
        await self._report(False)
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        """Every service NOT_SERVING (a draining node), and no more polling."""
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            try:
                now = self._probe()
            except Exception:
                log.exception("health probe failed")
                now = False
            if now != self._serving:
                await self._report(now)

    async def _report(self, now: bool) -> None:
        self._serving = now
        status = SERVING if now else NOT_SERVING
        await self.servicer.set("", status)
        await self.servicer.set(SAGAS_SERVICE, status)


def add_health_and_reflection(server: grpc.aio.Server, reporter: HealthReporter) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    reflection.enable_server_reflection(
        (SAGAS_SERVICE, CLUSTER_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )

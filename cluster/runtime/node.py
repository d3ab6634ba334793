"""`sagalog-node`: one node of the cluster as an OS process.

Lifecycle: read flags/config -> check the data directory's identity (refuse a
wiped node) -> start Raft and the gRPC server -> run the node's duties (register
its incarnation; as leader, commit a new Epoch) -> on SIGTERM or SIGINT, stop the
gRPC server, stop Raft, close the store, exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2, sagas_pb2_grpc

from cluster import auth, logformat
from cluster.grpcutil import PENDING_REQUEST_OPTIONS, SERVER_KEEPALIVE_OPTIONS, channel_to
from cluster.runtime import identity as ident
from cluster.runtime.config import NodeConfig, from_args, node_tls, participant_tls, shard_of
from cluster.runtime.groups import GroupRouter
from cluster.runtime.health import HealthReporter, add_health_and_reflection, serving
from cluster.runtime.httpserver import HttpServer, Request, Response, Routes
from cluster.runtime.lifetimes import Lifetimes
from cluster.runtime.metrics import Metrics, NodeState
from cluster.runtime.push import AppliedFeed
from cluster.runtime.retention import Retention
from cluster.runtime.sagas_service import MAX_PUSH_STREAMS, SagasService
from cluster.runtime.service import ClusterService, raft_role
from cluster.runtime.web import WebGateway, allowed_hosts, http_tls
from cluster.tracing import INSTALL_HINT, TracingUnavailable
from coordinator.admission import MAX_LIMIT
from coordinator.calls import ObservedTransport, ParticipantCalls, ParticipantTransport
from coordinator.driver import Driver
from coordinator.standby import Standby
from sagalog import codec
from sagalog import records as rec
from sagalog.journal import JournalCorrupt
from sagalog.log import LOG_FORMAT, SagaLog
from sagalog.membership import raft_node
from sagalog.proposer import ProposeError, Proposer
from sagalog.raft import EXIT_STORAGE_FAILURE, SagaLogRaft, fail_stop, leader_address
from sagalog.raft.status import ROLE_NAMES
from sagalog.rocks import RocksKV

if TYPE_CHECKING:
    from cluster.runtime.sagaspans import SagaSpans

GIL_SWITCH_INTERVAL_S = 0.0005

TransportWrapper = Callable[[ParticipantTransport], ParticipantTransport]
log = logging.getLogger("sagalog.node")

EXIT_USAGE = 2
EXIT_REFUSED = 78  # EX_CONFIG: this node must not start as configured

DUTY_PERIOD_S = 0.02
HAND_OVER_WAIT_S = 5.0  # for the coordinator to stop before leadership moves
GRPC_MAX_MESSAGE_BYTES = codec.MAX_BATCH_BYTES + (1 << 20)
# Calls a node holds at once, waiting ones included; past it gRPC answers
# RESOURCE_EXHAUSTED. Room for every Watch and Run stream plus the unary calls
# queued on the thread pool (whose queue would otherwise be unbounded).
MAX_CONCURRENT_RPCS = MAX_PUSH_STREAMS + 1_000


class WipedNodeError(Exception):
    pass


def check_not_wiped(config: NodeConfig, me: ident.Identity) -> None:
    """A new data directory: refuse to start if the cluster already registered this
    node with another incarnation (it voted before and has forgotten it)."""
    deadline = time.monotonic() + config.join_check_ms / 1000
    pending = {p.id: p for p in config.peers}
    while pending and time.monotonic() < deadline:
        for peer_id, peer in list(pending.items()):
            try:
                with channel_to(peer.grpc_addr, node_tls(config)) as channel:
                    reply = cluster_pb2_grpc.ClusterStub(channel).Status(
                        cluster_pb2.StatusRequest(), timeout=0.3, metadata=node_metadata(config)
                    )
            except grpc.RpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    # Not "not up yet": the check itself cannot be made, and skipping
                    # it could let a wiped node rejoin with its votes forgotten.
                    raise WipedNodeError(
                        f"node {me.node_id}: peer {peer_id} refused this node's credential "
                        f"({exc.code().name}): every node needs the same Raft password "
                        "file (nodes authenticate to each other with it)"
                    ) from exc
                continue
            del pending[peer_id]
            known = reply.registered.get(me.node_id)
            if known is not None and known != me.incarnation:
                raise WipedNodeError(
                    f"node {me.node_id}: the data directory {config.data_dir} is new, but node "
                    f"{peer_id} reports that the cluster registered {me.node_id} with "
                    f"incarnation {known.hex()}. This node's journal and votes are lost, so "
                    "it must not rejoin as if nothing happened. To re-add it: stop it, run "
                    f"`sagactl cluster forget-node --id {me.node_id}` against a running node, "
                    "then start it again with an empty data directory."
                )
        if pending:
            time.sleep(0.1)


def node_metadata(config: NodeConfig) -> list[tuple[str, str]]:
    """What this node presents when it calls another node on its own behalf."""
    password = config.raft_password
    return auth.bearer(auth.node_credential(password)) if password else []


def registry_in_store(data_dir: str) -> dict[str, bytes]:
    """The node registry as this node's store last applied it ({} for a new node)."""
    path = os.path.join(data_dir, "db")
    if not os.path.isdir(path):
        return {}
    kv = RocksKV(path)
    try:
        return SagaLog(kv).members()
    finally:
        kv.close()


class Node:
    """The gRPC server listens first (so that peers' wipe checks get answers while
    the cluster starts), then Raft starts (`start_raft`).

    The server is grpc.aio's, on an event loop of its own thread: Watch and Run are
    coroutines woken by applied records (`cluster.runtime.push`), so thousands can wait
    without a thread each; every other method runs on the server's thread pool
    (`grpc_workers` threads), which is also the loop's executor."""

    def __init__(
        self,
        config: NodeConfig,
        me: ident.Identity,
        wrap_participants: TransportWrapper | None = None,
    ) -> None:
        """`wrap_participants` wraps each driver's participant transport (the test
        kit's crash points); None: plain gRPC."""
        self._wrap_participants = wrap_participants
        self.config = config
        self.me = me
        self.shard_map, self.group = shard_of(config)
        self.service = ClusterService(
            config, registry_in_store(config.data_dir), self.shard_map, self.group
        )
        self._callers = auth.load(config.auth_file) if config.auth_file else None
        dial = participant_tls(config)
        self._participant_credentials = dial.channel_credentials() if dial else None
        self._executor = futures.ThreadPoolExecutor(
            max_workers=config.grpc_workers, thread_name_prefix="grpc"
        )
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._executor)
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="grpc-loop", daemon=True
        )
        self._loop_thread.start()
        self.feed: AppliedFeed | None = AppliedFeed(self._loop)
        self.raft: SagaLogRaft | None = None
        self._handing_over = False  # see hand_over
        self.health = HealthReporter(self.can_serve)
        self.metrics = Metrics(config.id, self.metrics_state)
        self.lifetimes = Lifetimes()
        self.spans = self._export_spans(config)
        self._http: list[HttpServer] = []
        self.web: WebGateway | None = None
        self._leader_seen: str | None = None
        self._leader_changes = 0
        self.server = self._on_loop(self._start_server())
        self.proposer: Proposer | None = None
        self._stopping = threading.Event()
        self._duties = threading.Thread(target=self._run_duties, name="duties", daemon=True)
        self.registered = False
        self._log_format_current = False  # the log is at LOG_FORMAT (seen or made so)
        self.epoch_term = -1  # the Raft term in which this node last committed an Epoch
        self.epoch_number = 0  # the epoch it committed then
        self.driver: Driver | None = None
        # Folds applied records while there is no driver (coordinator.standby);
        # the listener lock makes a switch between the two atomic with a delivery.
        self.standby: Standby | None = Standby() if self.config.coordinator else None
        self._listener_lock = threading.Lock()
        self.retention: Retention | None = None

    @staticmethod
    def _export_spans(config: NodeConfig) -> SagaSpans | None:
        """Traces, when --otlp-endpoint is given (and the `otel` extra installed)."""
        if not config.otlp_endpoint:
            return None
        try:
            from cluster.runtime.sagaspans import SagaSpans
        except ImportError as exc:
            raise TracingUnavailable(
                f"--otlp-endpoint needs OpenTelemetry: {INSTALL_HINT}"
            ) from exc
        return SagaSpans(config.id, config.otlp_endpoint)

    def start_raft(self) -> None:
        config = self.config
        raft = SagaLogRaft(
            raft_node(config.raft_addr, config.id, config.grpc_addr),
            [raft_node(p.raft_addr, p.id, p.grpc_addr) for p in config.peers],
            config.data_dir,
            config.timing,
            password=config.raft_password,
            compaction_min_entries=config.compaction_min_entries,
            fault_file=config.fault_file,
            joining=config.join,
        )
        # The push hooks first, then publish the node's Raft: a Watch can only
        # subscribe once it is published, and then misses no applied record.
        raft.saga_log.listener = self._on_applied
        raft.on_store_replaced = self._store_replaced
        self.raft = raft
        self.proposer = Proposer(
            self.raft, self.config.max_in_flight_proposals, self.metrics.observe_commit
        )
        self.service.attach(
            self.raft, self.proposer, self.in_office, self.office_term, self.hand_over
        )
        self._duties.start()
        self.retention = Retention(
            self.config.ended_retention_s, self.in_office, self._oldest_ended_ms, self._propose_one
        )
        self.retention.start()
        self._start_http()
        log.info(
            "node %s: raft %s, grpc %s, data %s",
            self.config.id,
            self.config.raft_addr,
            self.config.grpc_addr,
            self.config.data_dir,
        )

    def is_leader(self) -> bool:
        return self.raft is not None and raft_role(self.raft) == cluster_pb2.LEADER

    def office_term(self) -> int | None:
        """The Raft term in which this node is in office (its Epoch committed then)."""
        term = self.epoch_term
        return term if self.in_office() and term == self.epoch_term else None

    def office_epoch(self) -> int | None:
        """The epoch this node decides records in, while it is in office."""
        return self.epoch_number if self.in_office() else None

    def sagas_in_flight(self) -> int:
        driver = self.driver
        return driver.in_flight() if driver is not None else 0

    def saga_limit(self) -> int:
        driver = self.driver
        return driver.saga_limit() if driver is not None else MAX_LIMIT

    def coordinator_lag_s(self) -> float:
        driver = self.driver
        return driver.lag_s() if driver is not None else 0.0

    def leader_grpc_addr(self) -> str | None:
        leader = leader_address(self.raft) if self.raft is not None else None
        if leader is None:
            return None
        if leader == self.config.raft_addr:
            return self.config.grpc_addr
        return self.service.member_at(leader)[1] or None

    def can_serve(self) -> bool:
        """What gRPC health reports for the Sagas service (cluster.runtime.health)."""
        raft = self.raft
        if raft is None or not raft.is_member():
            return False  # starting, joining, or removed from the cluster
        return serving(raft.status(), self.in_office())

    def metrics_state(self) -> NodeState | None:
        """The node's state for a scrape (None until Raft starts)."""
        raft = self.raft
        if raft is None:
            return None
        status = raft.status()
        with raft.reading() as saga_log:
            epoch = saga_log.epoch().number
        feed = self.feed
        return NodeState(
            term=status.term,
            role=ROLE_NAMES.get(status.role, "follower"),
            in_office=self.in_office(),
            epoch=epoch,
            commit_index=status.commit_index,
            applied_index=status.applied_index,
            sagas_in_flight=self.sagas_in_flight(),
            admission_limit=self.saga_limit(),
            journal_bytes=raft.journal_bytes(),
            snapshot_age_s=raft.snapshot_age_s(),
            push_streams=feed.subscriptions if feed is not None else 0,
            leader_changes=self._leader_changes,
        )

    def _start_http(self) -> None:
        """The metrics and web listeners (one when their addresses are equal)."""
        config = self.config
        metrics = Routes()
        metrics.add("GET", "/metrics", self._scrape)
        if config.http_addr:
            self.web = WebGateway(config)
            routes = self.web.routes()
            if config.metrics_addr == config.http_addr:
                routes.extend(metrics)
            self._http.append(
                HttpServer(
                    config.http_addr, routes, http_tls(config), allowed_hosts(config.http_addr)
                )
            )
        if config.metrics_addr and config.metrics_addr != config.http_addr:
            self._http.append(HttpServer(config.metrics_addr, metrics))
        for server in self._http:
            server.start()

    def _scrape(self, request: Request) -> Response:
        return Response(200, CONTENT_TYPE_LATEST, self.metrics.exposition())

    def _on_loop(self, coro: Any, timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            migration_thread_pool=self._executor,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
            interceptors=(
                [auth.Authenticator(self._callers, self.config.raft_password)]
                if self._callers is not None
                else []
            ),
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                *PENDING_REQUEST_OPTIONS,
                *SERVER_KEEPALIVE_OPTIONS,
            ],
        )
        cluster_pb2_grpc.add_ClusterServicer_to_server(self.service, server)
        router = None
        if len(self.shard_map.groups) > 1:
            router = GroupRouter(self.shard_map, self.group, node_tls(self.config))
        sagas = SagasService(
            self,
            self.config.participant_allow,
            node_tls(self.config),
            self.metrics.refused_submit,
            router,
        )
        sagas_pb2_grpc.add_SagasServicer_to_server(sagas, server)
        add_health_and_reflection(server, self.health)
        tls = node_tls(self.config)
        if tls is None:
            port = server.add_insecure_port(self.config.grpc_addr)
        else:
            credentials = tls.server_credentials(self.config.tls_require_client_cert)
            port = server.add_secure_port(self.config.grpc_addr, credentials)
        if port == 0:
            raise OSError(f"cannot listen on --grpc-addr {self.config.grpc_addr}")
        await server.start()
        await self.health.start()
        return server

    def _on_applied(self, records: list[tuple[str, int, log_pb2.Record]]) -> None:
        """The Saga Log's listener (Raft thread): to the pushed streams, and to the
        coordinator while there is one."""
        if self.feed is not None:
            self.feed.publish(records)
        try:
            self._observe_applied(records)
        except Exception:
            # Metrics and traces must never stop the apply path: an exception here
            # would fail-stop this replica, and every replica applies the same records.
            log.exception("metrics or traces of applied records failed")
        with self._listener_lock:
            if self.driver is not None:
                self.driver.on_applied(records)
            elif self.standby is not None:
                self.standby.on_applied(records)

    def _observe_applied(self, records: list[tuple[str, int, log_pb2.Record]]) -> None:
        ended = self.lifetimes.observe(records)
        self.metrics.on_applied(records, ended, self.lifetimes.definition)
        if self.spans is not None and ended and self.in_office():
            self.spans.sagas_ended(ended)

    def _store_replaced(self) -> None:
        """A snapshot replaced the store (Raft thread): readers start again from it."""
        if self.feed is not None:
            self.feed.reset()
        self.lifetimes.forget()
        with self._listener_lock:  # in order with the records, on either side of a switch
            if self.standby is not None:
                self.standby.reset()

    def in_office(self) -> bool:
        """Leader with its own Epoch committed in the current term, and not handing
        leadership over."""
        raft = self.raft
        return (
            raft is not None
            and not self._handing_over
            and raft_role(raft) == cluster_pb2.LEADER
            and self.epoch_term == raft.raftCurrentTerm
        )

    def hand_over(self, on: bool) -> bool:
        """Leave office before leadership is handed to a follower (on=True): the
        follower campaigns at once (TimeoutNow), without the election timeout the
        lease's margin counts on, so this node's coordinator must have stopped
        acting first. True once it has (within HAND_OVER_WAIT_S). on=False: back
        in office if it still leads (the transfer failed)."""
        self._handing_over = on
        if not on:
            return True
        deadline = time.monotonic() + HAND_OVER_WAIT_S
        while self.driver is not None and time.monotonic() < deadline:
            time.sleep(DUTY_PERIOD_S)
        return self.driver is None

    def stop(self) -> None:
        self._stopping.set()
        for http in self._http:
            http.stop()
        if self.web is not None:
            self.web.close()
        try:
            self._on_loop(self.health.stop(), timeout_s=1.0)  # load balancers drain first
            self._on_loop(self.server.stop(grace=1.0), timeout_s=3.0)
        except Exception:
            log.exception("stopping the gRPC server")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=2.0)
        if self.raft is not None:
            if self.retention is not None:
                self.retention.stop()
            self._duties.join(timeout=5)
            self._stop_driver()
            if self.standby is not None:
                self.standby.stop()
            self.raft.close()
        if self.spans is not None:
            self.spans.close()  # exports what is queued
        log.info("node %s stopped", self.config.id)

    # ---- duties: registration and epochs -------------------------------------------

    def _run_duties(self) -> None:
        assert self.raft is not None
        while not self._stopping.wait(DUTY_PERIOD_S):
            try:
                self._count_leader_change()
                if not self.registered and leader_address(self.raft) is not None:
                    self._register()
                if raft_role(self.raft) == cluster_pb2.LEADER:
                    term = self.raft.raftCurrentTerm
                    if term != self.epoch_term:
                        self._take_office(term)
                    if self.in_office() and not self._log_format_current:
                        self._upgrade_log_format()
            except ProposeError as exc:
                log.debug("duty proposal failed, will retry: %s", exc)
            except Exception:
                # This thread must outlive any bug: without it the node would lead
                # in Raft yet never take office or drive a saga.
                log.exception("duty failed; retrying")
            try:
                self._keep_driver()
            except Exception:
                log.exception("driver management failed; retrying")

    def _count_leader_change(self) -> None:
        assert self.raft is not None
        leader = leader_address(self.raft)
        if leader is not None and leader != self._leader_seen:
            if self._leader_seen is not None:
                self._leader_changes += 1
            self._leader_seen = leader

    def _keep_driver(self) -> None:
        """The coordinator runs exactly while this node is in office."""
        assert self.raft is not None
        driver = self.driver
        if self.in_office() and self.config.coordinator:
            if driver is None or driver.epoch != self.epoch_number or not driver.running:
                self._stop_driver()
                driver = Driver(
                    self.raft,
                    self.epoch_number,
                    self.config.id,
                    on_fenced=self._fenced,
                    # Two thirds of the fallback: the driver stops acting before
                    # pysyncobj would even consider stepping down.
                    lease_s=self.config.timing.leader_fallback_ms * 2 / 3000,
                    in_office=self.in_office,
                    participants=self._participant_transport(),
                    observe_commit=self.metrics.observe_commit,
                )
                with self._listener_lock:  # records applied from now on reach the driver
                    self.driver, standby, self.standby = driver, self.standby, None
                try:
                    if standby is not None:
                        driver.adopt(standby.hand_over())
                finally:
                    driver.start()  # without the views it reads every saga from the store
        elif driver is not None:
            self._stop_driver()

    def _participant_transport(self) -> ParticipantTransport:
        # Participant calls share the gRPC server's event loop.
        calls: ParticipantTransport = ObservedTransport(
            ParticipantCalls(self._loop, self._participant_credentials), self._call_answered
        )
        return calls if self._wrap_participants is None else self._wrap_participants(calls)

    def _call_answered(
        self, request: Any, compensation: bool, reply: Any, sent: int, end: int
    ) -> None:
        self.metrics.observe_call(request, compensation, reply, sent, end)
        if self.spans is not None:
            self.spans.call(request, compensation, reply, sent, end, self.lifetimes.definition)

    def _stop_driver(self) -> None:
        with self._listener_lock:  # no more applied records reach the driver
            driver, self.driver = self.driver, None
            if self.standby is None and self.config.coordinator and not self._stopping.is_set():
                self.standby = Standby()  # knows the sagas that start from now on
        if driver is not None:
            driver.stop()

    def _fenced(self) -> None:
        # A newer epoch committed: whatever this node believes, it is not in office.
        self.epoch_term = -1

    def _propose_one(self, record: log_pb2.Record) -> log_pb2.RecordResult:
        assert self.proposer is not None
        result = self.proposer.propose(codec.encode_batch([record]), timeout_s=2.0)
        return result.results[0]

    def _upgrade_log_format(self) -> None:
        """Move the log to this code's format, so that what follows is applied under
        the new rules by every replica (each node of the cluster must run this code
        first: an older node stops at the record rather than diverge)."""
        assert self.raft is not None
        with self.raft.reading() as saga_log:
            current = saga_log.log_format()
        if current >= LOG_FORMAT:
            self._log_format_current = True
            return
        result = self._propose_one(rec.log_format(LOG_FORMAT, int(time.time() * 1000)))
        if result.verdict == log_pb2.REJECTED:
            log.error("LogFormat %d refused: %s", LOG_FORMAT, result.reason)
        else:
            self._log_format_current = True
            log.info("log format %d -> %d", current, LOG_FORMAT)

    def _oldest_ended_ms(self) -> int | None:
        assert self.raft is not None
        with self.raft.reading() as saga_log:
            return saga_log.oldest_ended_ms()

    def _register(self) -> None:
        result = self._propose_one(rec.member(self.me.node_id, self.me.incarnation))
        if result.verdict == log_pb2.REJECTED:
            fail_stop(f"the cluster refused this node: {result.reason}")
        self.registered = True
        log.info("node %s registered (incarnation %s)", self.me.node_id, self.me.incarnation.hex())

    def _take_office(self, term: int) -> None:
        """A new leader commits Epoch(n+1) before anything it decides counts."""
        assert self.raft is not None
        with self.raft.reading() as saga_log:
            number = saga_log.epoch().number + 1
        result = self._propose_one(rec.epoch(number, self.me.node_id, int(time.time() * 1000)))
        if result.verdict in (log_pb2.ACCEPTED, log_pb2.DUPLICATE):
            self.epoch_number = number
            self.epoch_term = term
            log.info("node %s took office: epoch %d (term %d)", self.me.node_id, number, term)
        # REJECTED: another epoch committed first; the next round proposes a newer one.


GC_WARN_S = 0.05
# Python's collector scans every tracked object in a full (generation 2)
# collection: with tens of thousands of sagas in memory that took 100-500 ms, and
# a leader whose Raft thread stands still 300 ms steps down. Resuming 30,000
# sagas, that happened every second or two. Young collections stay frequent (most
# cyclic garbage dies young); full ones become rare.
GC_THRESHOLDS = (20_000, 5, 1000)


def _watch_gc() -> None:
    """Log garbage collections long enough to hold up the Raft thread."""
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.monotonic()
            return
        took = time.monotonic() - started[0]
        if took >= GC_WARN_S:
            log.warning(
                "garbage collection of generation %d took %.0f ms", info["generation"], took * 1000
            )

    gc.callbacks.append(callback)
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: list[str] | None = None, wrap_participants: TransportWrapper | None = None) -> int:
    try:
        config, level = from_args(argv)
    except (ValueError, OSError, TypeError) as exc:
        print(f"sagalog-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The Raft thread does little work between many socket and fsync calls, each of
    # which releases the GIL; with the default 5 ms switch interval, every re-take
    # could wait 5 ms behind a busy coordinator, and a leader resuming 10,000
    # sagas missed its 300 ms fallback and lost office again and again.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    _watch_gc()
    logformat.configure(config.id, level, config.log_format)
    node = None
    try:
        me = ident.open_data_dir(config.data_dir, config.id)
        node = Node(config, me, wrap_participants)
        if me.created:
            check_not_wiped(config, me)
            ident.persist(config.data_dir, me)
        node.start_raft()
    except JournalCorrupt as exc:
        log.critical("refusing to start: the Raft journal is corrupt: %s", exc)
        if node is not None:
            node.stop()
        return EXIT_STORAGE_FAILURE
    except (auth.AuthError, TracingUnavailable) as exc:
        log.critical("refusing to start: %s", exc)
        return EXIT_USAGE
    except (ident.IdentityError, WipedNodeError, OSError) as exc:
        log.critical("refusing to start: %s", exc)
        if node is not None:
            node.stop()
        return EXIT_REFUSED
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        pass
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bad input, kind by kind, against a real cluster: each gets its own clear status
code, and after each the cluster still completes a saga. The module ends with the
global check: every saga acknowledged here ended, and the guarantee holds in the
participants' own databases.

The Raft port's kinds (unauthenticated and replayed frames, 2^31 length prefixes,
read-only peers, utility commands, idle connections) are in test_raft_port.py;
decode and apply are fuzzed in tests/unit/test_apply_fuzz.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2, sagas_pb2, sagas_pb2_grpc
from test_sagas import check_guarantee

from cluster.client.logclient import LogClient
from cluster.client.saga_client import SagaClient
from cluster.grpcutil import channel_to
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition
from sagalog import codec
from sagalog import records as rec

pytestmark = pytest.mark.cluster

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
acknowledged: list[str] = []  # sagas this module started: all must end


class World:
    def __init__(self, cluster: LocalCluster, parts: TravelParticipants) -> None:
        self.cluster = cluster
        self.parts = parts
        self.addr = next(iter(cluster.specs.values())).grpc_addr
        self.channel = channel_to(self.addr)
        self.sagas = sagas_pb2_grpc.SagasStub(self.channel)
        self.admin = cluster_pb2_grpc.ClusterStub(self.channel)
        self.client = SagaClient([s.grpc_addr for s in cluster.specs.values()])
        self.definition = travel_definition(parts.endpoints)
        self.runs = 0

    def still_works(self) -> None:
        self.runs += 1
        saga_id = f"still-works-{self.runs}"
        info = self.client.run(self.definition, saga_id=saga_id, timeout_s=30)
        acknowledged.append(saga_id)
        assert info.state == sagas_pb2.COMPLETED


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("bad-input")
    cluster = LocalCluster(str(base / "cluster"), nodes=3)
    parts = TravelParticipants(str(base / "parts"))
    cluster.start_all()
    parts.start_all()
    try:
        cluster.wait_for_leader(15)
        parts.wait_ready(15)
        w = World(cluster, parts)
        yield w
        w.client.close()
        w.channel.close()
    except BaseException:
        print(cluster.logs(60))
        raise
    finally:
        parts.stop_all()
        cluster.stop_all()


# ---- definitions: every bound, and one past it --------------------------------------


def chain(n: int = 1, **vertex: Any) -> log_pb2.SagaDefinition:
    d = log_pb2.SagaDefinition(name="bad-input")
    for i in range(n):
        v = d.vertices.add(name=f"v{i}", endpoint="127.0.0.1:1", request="Do", compensation="Undo")
        if i:
            v.depends_on.append(f"v{i - 1}")
    for key, value in vertex.items():
        if key == "backoff":
            d.vertices[0].backoff.CopyFrom(log_pb2.Backoff(**value))
        elif key == "depends_on":
            d.vertices[0].depends_on.extend(value)
        else:
            setattr(d.vertices[0], key, value)
    return d


def named(name: str) -> log_pb2.SagaDefinition:
    d = chain()
    d.name = name
    return d


def two_with(first: dict, second: dict) -> log_pb2.SagaDefinition:
    d = chain(2)
    for key, value in first.items():
        if key == "depends_on":
            d.vertices[0].depends_on.extend(value)
        else:
            setattr(d.vertices[0], key, value)
    for key, value in second.items():
        if key == "depends_on":
            del d.vertices[1].depends_on[:]
            d.vertices[1].depends_on.extend(value)
        else:
            setattr(d.vertices[1], key, value)
    return d


DEFINITIONS: dict[str, tuple[log_pb2.SagaDefinition, grpc.StatusCode]] = {
    "no vertices": (log_pb2.SagaDefinition(name="empty"), INVALID),
    "64 vertices (the bound)": (chain(codec.MAX_VERTICES), OK),
    "65 vertices": (chain(codec.MAX_VERTICES + 1), INVALID),
    "definition name of 128": (named("n" * 128), OK),
    "definition name of 129": (named("n" * 129), INVALID),
    "duplicate vertex names": (two_with({}, {"name": "v0"}), INVALID),
    "a cycle": (two_with({"depends_on": ["v1"]}, {}), INVALID),
    "a vertex depending on itself": (chain(depends_on=["v0"]), INVALID),
    "an unknown dependency": (chain(depends_on=["nowhere"]), INVALID),
    "a dependency listed twice": (two_with({}, {"depends_on": ["v0", "v0"]}), INVALID),
    "an empty vertex name": (chain(name=""), INVALID),
    "a vertex name with a NUL": (chain(name="v\x00"), INVALID),
    "a vertex name with a newline": (chain(name="v\n1"), INVALID),
    "a vertex name of 129": (chain(name="v" * 129), INVALID),
    "endpoint unix:": (chain(endpoint="unix:/var/run/docker.sock"), INVALID),
    "endpoint unix:// with a port": (chain(endpoint="unix:///tmp/s:80"), INVALID),
    "endpoint dns:///": (chain(endpoint="dns:///example.com:443"), INVALID),
    "endpoint vsock:": (chain(endpoint="vsock:2:1024"), INVALID),
    "endpoint ipv4: scheme": (chain(endpoint="ipv4:127.0.0.1:80"), INVALID),
    "endpoint port 0": (chain(endpoint="127.0.0.1:0"), INVALID),
    "endpoint port 65536": (chain(endpoint="127.0.0.1:65536"), INVALID),
    "endpoint host of 254": (chain(endpoint="h" * 254 + ":80"), INVALID),
    "endpoint without a port": (chain(endpoint="127.0.0.1"), INVALID),
    "endpoint with a path": (chain(endpoint="127.0.0.1:80/x"), INVALID),
    "an empty request action": (chain(request=""), INVALID),
    "a compensation action with a space": (chain(compensation="Un do"), INVALID),
    "timeout_ms 9": (chain(timeout_ms=9), INVALID),
    "timeout_ms 10 (the bound)": (chain(timeout_ms=10), OK),
    "timeout_ms 300001": (chain(timeout_ms=300_001), INVALID),
    "max_attempts 100 (the bound)": (chain(max_attempts=100), OK),
    "max_attempts 101": (chain(max_attempts=101), INVALID),
    "backoff initial 300001": (chain(backoff={"initial_ms": 300_001}), INVALID),
    "backoff max below initial": (chain(backoff={"initial_ms": 100, "max_ms": 50}), INVALID),
    "backoff multiplier 11": (chain(backoff={"multiplier": 11.0}), INVALID),
}


@pytest.mark.parametrize("kind", list(DEFINITIONS))
def test_definitions(world: World, kind: str) -> None:
    definition, expected = DEFINITIONS[kind]
    if expected == OK:  # accepted, so it runs: against a participant that exists
        definition = log_pb2.SagaDefinition.FromString(definition.SerializeToString())
        for v in definition.vertices:
            v.endpoint = world.parts.endpoints["Hotel"]
    saga_id = f"def-{len(acknowledged)}"
    request = sagas_pb2.SubmitRequest(definition=definition, saga_id=saga_id)
    code = _code(lambda: world.sagas.Submit(request, timeout=10))
    assert code == expected, kind
    if code == OK:
        acknowledged.append(saga_id)
    world.still_works()


# ---- ids, payloads and the other methods ----------------------------------------------

ID_KINDS = {
    "saga id of 128 (the bound)": ("i" * 128, OK),
    "saga id of 129": ("i" * 129, INVALID),
    "saga id with a NUL": ("a\x00b", INVALID),
    "saga id with a newline": ("a\nb", INVALID),
    "saga id with an escape": ("a\x1b[2Jb", INVALID),
    "saga id with a space": ("a b", INVALID),
    "saga id with a slash": ("a/b", INVALID),
    "saga id not ASCII": ("r\u00e9servation", INVALID),
}


@pytest.mark.parametrize("kind", list(ID_KINDS))
def test_saga_ids(world: World, kind: str) -> None:
    saga_id, expected = ID_KINDS[kind]
    request = sagas_pb2.SubmitRequest(definition=world.definition, saga_id=saga_id)
    assert _code(lambda: world.sagas.Submit(request, timeout=10)) == expected
    get = sagas_pb2.GetRequest(saga_id=saga_id)
    assert _code(lambda: world.sagas.Get(get, timeout=10)) == (OK if expected == OK else INVALID)
    if expected == OK:
        acknowledged.append(saga_id)
    world.still_works()


def _calls(world: World) -> dict[str, tuple[Callable[[], Any], grpc.StatusCode]]:
    s, a, d = world.sagas, world.admin, world.definition
    big = b"p" * (codec.MAX_PAYLOAD_BYTES + 1)
    return {
        "payload of 256 KiB + 1": (
            lambda: s.Submit(sagas_pb2.SubmitRequest(definition=d, payload=big), timeout=10),
            INVALID,
        ),
        "a message over gRPC's limit": (
            lambda: s.Submit(
                sagas_pb2.SubmitRequest(definition=d, payload=b"x" * (20 << 20)), timeout=10
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        "Get of an unknown saga": (
            lambda: s.Get(sagas_pb2.GetRequest(saga_id="never"), timeout=10),
            grpc.StatusCode.NOT_FOUND,
        ),
        "Get with an empty id": (lambda: s.Get(sagas_pb2.GetRequest(), timeout=10), INVALID),
        "List page_size 1001": (
            lambda: s.List(sagas_pb2.ListRequest(page_size=1001), timeout=10),
            INVALID,
        ),
        "List with a junk page token": (
            lambda: s.List(sagas_pb2.ListRequest(page_token="\u2603" * 100), timeout=10),
            OK,
        ),
        "Watch with a bad id": (
            lambda: list(s.Watch(sagas_pb2.WatchRequest(saga_id="a b"), timeout=10)),
            INVALID,
        ),
        "Watch of an unknown saga": (
            lambda: list(s.Watch(sagas_pb2.WatchRequest(saga_id="never"), timeout=15)),
            grpc.StatusCode.NOT_FOUND,
        ),
        "Abort of an unknown saga": (
            lambda: s.Abort(sagas_pb2.AbortRequest(saga_id="never"), timeout=10),
            grpc.StatusCode.NOT_FOUND,
        ),
        "Resolve without a reason": (
            lambda: s.Resolve(sagas_pb2.ResolveRequest(saga_id="still-works-1"), timeout=10),
            INVALID,
        ),
        "Resolve of an unknown vertex": (
            lambda: s.Resolve(
                sagas_pb2.ResolveRequest(saga_id="still-works-1", vertex="Ghost", reason="x"),
                timeout=10,
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        "Resolve of a compensation that is not STUCK": (
            lambda: s.Resolve(
                sagas_pb2.ResolveRequest(saga_id="still-works-1", vertex="Hotel", reason="x"),
                timeout=10,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "Abort of an ended saga": (
            lambda: s.Abort(sagas_pb2.AbortRequest(saga_id="still-works-1"), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "Run with a bad definition": (
            lambda: s.Run(sagas_pb2.SubmitRequest(definition=chain(0), saga_id="r"), timeout=10),
            INVALID,
        ),
        "Run past its deadline": (
            lambda: s.Run(
                sagas_pb2.SubmitRequest(definition=d, saga_id="run-short-deadline"),
                timeout=0.001,
            ),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ),
        "Submit of another saga under a used id": (
            lambda: s.Submit(
                sagas_pb2.SubmitRequest(definition=d, payload=b"other", saga_id="still-works-1"),
                timeout=10,
            ),
            grpc.StatusCode.ALREADY_EXISTS,
        ),
        "Cluster.Propose (off by default)": (
            lambda: a.Propose(
                cluster_pb2.ProposeRequest(
                    batch=codec.encode_batch([rec.epoch(2**64 - 1, "evil")])
                ),
                timeout=10,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "ForgetMember of a connected peer": (
            lambda: a.ForgetMember(
                cluster_pb2.ForgetMemberRequest(
                    node_id=next(n for n in world.cluster.specs if n != "n1")
                ),
                timeout=10,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "ForgetMember of itself": (
            lambda: a.ForgetMember(cluster_pb2.ForgetMemberRequest(node_id="n1"), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "ReadSaga with a bad id": (
            lambda: a.ReadSaga(cluster_pb2.ReadSagaRequest(saga_id="a\x00"), timeout=10),
            INVALID,
        ),
        "a method that does not exist": (
            lambda: world.channel.unary_unary("/saga.v1.Sagas/DropEverything")(b"", timeout=10),
            grpc.StatusCode.UNIMPLEMENTED,
        ),
        "bytes that are not a SubmitRequest": (
            lambda: world.channel.unary_unary("/saga.v1.Sagas/Submit")(
                b"\xff\xff\xff\xff\x0f", timeout=10
            ),
            grpc.StatusCode.UNKNOWN,  # grpc.aio's answer to an undecodable request
        ),
    }


# The kinds' names, from the table itself (no call is made to build it).
CALL_KINDS = list(_calls(SimpleNamespace(sagas=None, admin=None, definition=None)))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", CALL_KINDS)
def test_calls(world: World, kind: str) -> None:
    if world.runs == 0:
        world.still_works()  # still-works-1 exists for the kinds that name it
    call, expected = _calls(world)[kind]
    assert _code(call) == expected, kind
    if kind == "Run past its deadline":
        acknowledged.append("run-short-deadline")  # it may have been submitted: it must end
    world.still_works()


def test_thousands_of_idle_connections_and_streams_that_never_read(world: World) -> None:
    host, port = world.addr.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(1000)]
    unread = [
        world.sagas.Watch(sagas_pb2.WatchRequest(saga_id="still-works-1"), timeout=60)
        for _ in range(200)
    ]
    try:
        started = time.monotonic()
        world.still_works()
        assert time.monotonic() - started < 30
    finally:
        for stream in unread:
            stream.cancel()
        for sock in idle:
            sock.close()
    world.still_works()


def test_every_acknowledged_saga_ended_and_the_guarantee_holds(world: World) -> None:
    """Runs last in this module: nothing acknowledged above was lost."""
    travel = [s for s in acknowledged if s.startswith("still-works")]
    assert len(travel) >= 60
    for saga_id in acknowledged:
        try:
            info = world.client.wait_for_end(saga_id, 30)
        except grpc.RpcError as exc:
            # Only the deadline case may legitimately never have reached the log.
            assert saga_id == "run-short-deadline", (saga_id, exc)
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            continue
        assert info.state in (sagas_pb2.COMPLETED, sagas_pb2.ABORTED), saga_id
    check_guarantee(world.client, world.parts, travel)
    with LogClient([s.grpc_addr for s in world.cluster.specs.values()]) as logs:
        deadline = time.monotonic() + 20
        while True:
            digests = {
                (d.applied_index, d.sha256)
                for d in (logs.digest(s.grpc_addr) for s in world.cluster.specs.values())
            }
            if len(digests) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert len(digests) == 1, f"replicas differ: {digests}"


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return OK

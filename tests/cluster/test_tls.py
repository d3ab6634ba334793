"""TLS on every gRPC link, with tokens: client to node, node to node (forwarding,
ReadIndex), coordinator to participant. A plaintext client, or one that trusts
another CA, reaches nothing; with mutual TLS a client without a certificate neither."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from saga.v1 import sagas_pb2
from test_sagas import check_guarantee

from cluster.client.saga_client import SagaClient
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition
from cluster.tls import make_dev_certs

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", params=["tls", "mutual-tls"])
def secured(request, tmp_path_factory) -> Iterator[tuple[LocalCluster, TravelParticipants]]:
    base = tmp_path_factory.mktemp(request.param)
    extra = ("--tls-require-client-cert",) if request.param == "mutual-tls" else ()
    cluster = LocalCluster(
        str(base / "cluster"),
        auth=True,
        tls=True,
        participant_tls=True,
        extra_args=extra,
        http=True,
    )
    parts = TravelParticipants(str(base / "parts"), tls_dir=cluster.tls_dir)
    parts.start_all()
    cluster.start_all()
    try:
        parts.wait_ready(15)
        cluster.wait_for_leader(15)
        yield cluster, parts
    except BaseException:
        print(cluster.logs(60))
        print(parts.logs())
        raise
    finally:
        cluster.stop_all()
        parts.stop_all()


def _client(cluster: LocalCluster, addrs: list[str], **tls: str | None) -> SagaClient:
    return SagaClient(addrs, token=cluster.tokens["client"], retry_deadline_s=2, **tls)  # type: ignore[arg-type]


def test_sagas_run_over_tls_through_a_follower(secured) -> None:
    cluster, parts = secured
    leader = cluster.wait_for_leader(10).id
    follower = next(s.grpc_addr for n, s in cluster.specs.items() if n != leader)
    files = cluster.client_tls
    assert files is not None
    with _client(
        cluster, [follower], tls_ca=files.ca, tls_cert=files.cert, tls_key=files.key
    ) as client:
        info = client.run(travel_definition(parts.endpoints), saga_id="over-tls", timeout_s=30)
        assert info.state == sagas_pb2.COMPLETED  # participants were called over TLS
        assert client.get("over-tls") == info  # ReadIndex asked of the leader over TLS
        check_guarantee(client, parts, ["over-tls"])


def test_plaintext_or_another_ca_reaches_nothing(secured, tmp_path) -> None:
    cluster, _ = secured
    addrs = [s.grpc_addr for s in cluster.specs.values()]
    make_dev_certs(str(tmp_path / "other"))
    attempts = {
        "plaintext": {},
        "another CA": {"tls_ca": os.path.join(tmp_path, "other", "ca.pem")},
    }
    for what, tls in attempts.items():
        with _client(cluster, addrs, **tls) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.get("over-tls")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what


def test_mutual_tls_needs_a_client_certificate(secured) -> None:
    cluster, _ = secured
    files = cluster.client_tls
    assert files is not None
    addrs = [s.grpc_addr for s in cluster.specs.values()]
    mutual = "--tls-require-client-cert" in cluster.extra_args
    with _client(cluster, addrs, tls_ca=files.ca) as no_cert:
        if mutual:
            with pytest.raises(grpc.RpcError) as refused:
                list(no_cert.list())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            assert list(no_cert.list()) is not None


def test_the_web_page_is_https_and_an_idle_connection_blocks_nothing(secured) -> None:
    """The page and /metrics are served with the node's certificate (and, with
    mutual TLS, only to a client certificate); a client that connects and says
    nothing holds neither the listener nor a stopping node."""
    cluster, _ = secured
    mutual = "--tls-require-client-cert" in cluster.extra_args
    leader = cluster.wait_for_leader(10).id
    follower = next(n for n in cluster.specs if n != leader)
    host, port = cluster.specs[follower].http_addr.rsplit(":", 1)
    files = cluster.client_tls
    assert files is not None
    anonymous = ssl.create_default_context(cafile=str(files.ca))
    with_cert = ssl.create_default_context(cafile=str(files.ca))
    with_cert.load_cert_chain(str(files.cert), str(files.key))
    url = f"https://{host}:{port}/api/cluster"
    token = {"Authorization": "Bearer " + cluster.tokens["client"]}
    idle = socket.create_connection((host, int(port)))  # says nothing, ever
    try:
        reply = urllib.request.urlopen(
            urllib.request.Request(url, headers=token), timeout=5, context=with_cert
        )
        assert json.loads(reply.read())["served_by"] == follower
        if mutual:  # no client certificate, no page
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                urllib.request.urlopen(
                    urllib.request.Request(url, headers=token), timeout=5, context=anonymous
                ).read()
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
        cluster.kill(follower, signal.SIGTERM)
        assert cluster.procs[follower].returncode == 0  # stopped cleanly, not killed
    finally:
        idle.close()
        if not cluster.alive(follower):
            cluster.start(follower)
            cluster.wait_for_leader(20)


def test_a_participant_takes_calls_only_from_the_nodes(secured) -> None:
    """The travel participants run with --tls-require-client-cert: a caller without
    a certificate from the nodes' CA cannot book or cancel anything."""
    from saga.v1 import participant_pb2, participant_pb2_grpc

    from cluster.grpcutil import channel_to
    from cluster.tls import TlsFiles

    cluster, parts = secured
    assert cluster.client_tls is not None
    request = participant_pb2.StepRequest(
        saga_id="intruder", vertex="Hotel", action="CancelHotel",
        idempotency_key="intruder/Hotel/compensation", attempt=1, epoch=1,
    )  # fmt: skip
    with channel_to(parts.endpoints["Hotel"], TlsFiles(ca=cluster.client_tls.ca)) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            participant_pb2_grpc.ParticipantStub(channel).Compensate(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert parts.state("Hotel").calls_for("intruder/Hotel/request") == []

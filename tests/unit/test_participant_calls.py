"""The driver's participant transport: calls on one grpc.aio loop, answers by callback."""

from __future__ import annotations

import queue
from concurrent import futures

import grpc
from saga.v1 import participant_pb2, participant_pb2_grpc

from cluster.testkit.launcher import free_ports
from coordinator import core
from coordinator.calls import ParticipantCalls


class _Echo(participant_pb2_grpc.ParticipantServicer):
    def Execute(self, request, context):  # noqa: N802 (gRPC's name)
        return participant_pb2.StepReply(ok=True, output=f"did {request.action}".encode())

    def Compensate(self, request, context):  # noqa: N802
        return participant_pb2.StepReply(ok=False, error=f"refused {request.action}")


def _request(action: str) -> participant_pb2.StepRequest:
    return participant_pb2.StepRequest(saga_id="s", vertex="v", action=action)


def test_requests_and_compensations_reach_their_method_and_answer_by_callback() -> None:
    (port,) = free_ports(1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    participant_pb2_grpc.add_ParticipantServicer_to_server(_Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    calls = ParticipantCalls()  # a loop thread of its own
    answers: queue.Queue[tuple[str, core.Reply]] = queue.Queue()
    try:
        for i in range(50):  # many at once, on one loop
            calls.send(
                f"127.0.0.1:{port}",
                _request(f"Book{i}"),
                False,
                5.0,
                lambda r, i=i: answers.put((f"Book{i}", r)),
            )
        calls.send(
            f"127.0.0.1:{port}", _request("Cancel"), True, 5.0, lambda r: answers.put(("C", r))
        )
        got = dict(answers.get(timeout=10) for _ in range(51))
        assert got["Book7"] == core.Reply(True, b"did Book7", "")
        assert got["C"] == core.Reply(False, b"", "refused Cancel")
    finally:
        calls.close()
        server.stop(0)


def test_a_participant_that_is_not_there_is_a_transport_failure_without_its_text() -> None:
    (port,) = free_ports(1)  # nothing listens
    calls = ParticipantCalls()
    answers: queue.Queue[core.Reply] = queue.Queue()
    try:
        calls.send(f"127.0.0.1:{port}", _request("Book"), False, 2.0, answers.put)
        calls.send("not a target:::", _request("Book"), False, 2.0, answers.put)
        for _ in range(2):
            reply = answers.get(timeout=10)
            assert reply.ok is None
            assert reply.error.endswith("participant 'v' could not be reached")
            assert "127.0.0.1" not in reply.error
    finally:
        calls.close()

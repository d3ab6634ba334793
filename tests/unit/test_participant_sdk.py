"""The participant SDK's guarantees, for any handler.

A Hypothesis state machine delivers requests and compensations duplicated, out of
order, from old and new coordinator epochs, several at once, and interrupted by
crashes (a handler that dies mid-write, a reply lost after the commit, a restart),
and checks after every step what the saga guarantee needs from a participant:

* a request takes effect at most once, and every answer to it is its first answer;
* a compensation undoes its request at most once, whatever key asks for it;
* once a compensation is acknowledged, the request is not in effect and never will be
  (a late request is refused without running);
* a call older than an epoch already answered for its saga is refused and does nothing.

It runs once with plain handlers and once with async handlers (the event-loop driver).
The README's example participant is run as written, as a process, over gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from saga.v1 import participant_pb2, participant_pb2_grpc

from cluster.grpcutil import channel_to
from cluster.participant import Participant, Refused, Step
from cluster.participant.ledger import (
    ANSWER_ERROR,
    ANSWER_INVALID,
    ANSWER_OK,
    ANSWER_STALE_EPOCH,
    COMPENSATE,
    EXECUTE,
    LATE_REQUEST_ERROR,
    Outcome,
    Reply,
    read_ledger,
)
from cluster.testkit.launcher import free_ports

ROOT = Path(__file__).resolve().parents[2]
SAGAS = ("s0", "s1", "s2")
EPOCHS = st.integers(1, 3)
SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (request_key TEXT NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS undos (request_key TEXT NOT NULL, booked BLOB)
"""


class Crash(BaseException):
    """The process dies inside a handler: nothing after this point happens."""


def request_key(saga: str) -> str:
    return f"{saga}/V/request"


def refuses(saga: str) -> bool:
    """The handler's business rule: some sagas are refused, always the same ones."""
    return hashlib.sha256(saga.encode()).digest()[0] % 3 == 0


@dataclass
class Faults:
    """What the next handler run does beside its work (set by the machine)."""

    crash: bool = False
    fail: bool = False


def build(db_path: str, faults: Faults, use_async: bool) -> Participant:
    """A participant whose request writes an effect row and whose compensation marks
    it undone, both through step.db; as plain or as async handlers."""
    p = Participant("Test", db_path, schema=SCHEMA)

    def book(step: Step) -> bytes:
        if refuses(step.saga_id):
            step.db.execute(
                "INSERT INTO effects VALUES (?, 'refused-but-written')", (step.request_key,)
            )
            raise Refused("no rooms")
        step.db.execute("INSERT INTO effects VALUES (?, 'done')", (step.request_key,))
        if faults.crash:
            raise Crash()
        if faults.fail:
            raise RuntimeError("downstream is down")
        return f"booking-of-{step.saga_id}".encode()

    def cancel(step: Step, booked: bytes | None) -> None:
        step.db.execute("INSERT INTO undos VALUES (?, ?)", (step.request_key, booked))
        step.db.execute(
            "UPDATE effects SET state = 'undone' WHERE request_key = ?", (step.request_key,)
        )
        if faults.crash:
            raise Crash()
        if faults.fail:
            raise RuntimeError("downstream is down")

    if use_async:

        async def abook(step: Step) -> bytes:
            await asyncio.sleep(0)
            return book(step)

        async def acancel(step: Step, booked: bytes | None) -> None:
            await asyncio.sleep(0)
            cancel(step, booked)

        p.request("Book")(abook)
        p.compensation("Cancel")(acancel)
    else:
        p.request("Book")(book)
        p.compensation("Cancel")(cancel)
    return p


def step_request(kind: str, saga: str, epoch: int, attempt: int, variant: int = 0) -> object:
    key = request_key(saga)
    return participant_pb2.StepRequest(
        saga_id=saga,
        vertex="V",
        action="Book" if kind == EXECUTE else "Cancel",
        payload=b"{}",
        idempotency_key=key if kind == EXECUTE else f"{saga}/V/compensation/{variant}",
        request_key=key,
        attempt=attempt,
        epoch=epoch,
    )


@dataclass
class Model:
    first_answer: dict[str, Reply] = field(default_factory=dict)  # by request key
    compensated: set[str] = field(default_factory=set)  # acknowledged compensations
    epoch: dict[str, int] = field(default_factory=dict)  # newest seen, by saga
    # Keys a call may have changed without the model seeing the answer (a lost reply).
    uncertain: set[str] = field(default_factory=set)


class ParticipantMachine(RuleBasedStateMachine):
    use_async = False

    def __init__(self) -> None:
        super().__init__()
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.TemporaryDirectory(dir=base)
        self.db_path = os.path.join(self.dir.name, "p.sqlite")
        self.faults = Faults()
        self.p = build(self.db_path, self.faults, self.use_async)
        self.model = Model()
        self.attempts = 0

    def teardown(self) -> None:
        self.p.close()
        self.dir.cleanup()

    # ---- delivery ------------------------------------------------------------------------

    def deliver(self, requests: list[object]) -> list[Outcome]:
        """Deliver at once (one at a time if there is one); the outcomes in order."""
        if self.use_async:

            async def all_at_once() -> list[Outcome]:
                return list(
                    await asyncio.gather(*(self.p.handle_async(self.kind(r), r) for r in requests))
                )

            return asyncio.run(all_at_once())
        if len(requests) == 1:
            return [self.p.handle(self.kind(requests[0]), requests[0])]
        outcomes: list[Outcome | None] = [None] * len(requests)

        def one(i: int) -> None:
            outcomes[i] = self.p.handle(self.kind(requests[i]), requests[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    @staticmethod
    def kind(request: object) -> str:
        return EXECUTE if request.action == "Book" else COMPENSATE  # type: ignore[attr-defined]

    def request(self, kind: str, saga: str, epoch: int, variant: int = 0) -> object:
        self.attempts += 1
        return step_request(kind, saga, epoch, self.attempts, variant)

    def check(self, requests: list[object], outcomes: list[Outcome], lost: bool = False) -> None:
        """Check each outcome against what was known before the batch, then learn."""
        newest_before = dict(self.model.epoch)
        for req, outcome in zip(requests, outcomes, strict=True):
            saga, epoch = req.saga_id, req.epoch  # type: ignore[attr-defined]
            key = request_key(saga)
            if outcome.answer == ANSWER_STALE_EPOCH:
                newest = max([newest_before.get(saga, 0)] + self.batch_epochs(requests, saga))
                assert epoch < newest, (epoch, newest)
                continue
            assert epoch >= newest_before.get(saga, 0), "an older epoch was acted on"
            assert outcome.answer not in (ANSWER_INVALID,), outcome
            # The call was seen (even if its handler failed): its epoch is the newest.
            self.model.epoch[saga] = max(self.model.epoch.get(saga, 0), epoch)
            if outcome.answer == ANSWER_ERROR:
                continue  # the handler failed: nothing kept, the coordinator retries
            assert outcome.reply is not None
            if lost:
                self.model.uncertain.add(key)
            elif self.kind(req) == EXECUTE:
                if key in self.model.first_answer:
                    assert outcome.reply == self.model.first_answer[key], "not the first answer"
                else:
                    late = Reply(False, b"", LATE_REQUEST_ERROR)
                    if refuses(saga):
                        by_rule = Reply(False, b"", "no rooms")
                    else:
                        by_rule = Reply(True, f"booking-of-{saga}".encode(), "")
                    if key in self.model.uncertain:
                        assert outcome.reply in (late, by_rule), outcome.reply
                    elif key in self.model.compensated:
                        assert outcome.reply == late
                    else:
                        assert outcome.reply == by_rule
                    self.model.first_answer[key] = outcome.reply
            else:
                assert outcome.reply.ok, "a compensation always succeeds"
                self.model.compensated.add(key)

    @staticmethod
    def batch_epochs(requests: list[object], saga: str) -> list[int]:
        return [r.epoch for r in requests if r.saga_id == saga]  # type: ignore[attr-defined]

    # ---- rules ---------------------------------------------------------------------------

    @rule(saga=st.sampled_from(SAGAS), epoch=EPOCHS)
    def execute(self, saga: str, epoch: int) -> None:
        req = self.request(EXECUTE, saga, epoch)
        self.check([req], self.deliver([req]))

    @rule(saga=st.sampled_from(SAGAS), epoch=EPOCHS, variant=st.integers(0, 1))
    def compensate(self, saga: str, epoch: int, variant: int) -> None:
        req = self.request(COMPENSATE, saga, epoch, variant)
        self.check([req], self.deliver([req]))

    @rule(
        calls=st.lists(
            st.tuples(
                st.sampled_from((EXECUTE, COMPENSATE)),
                st.sampled_from(SAGAS),
                EPOCHS,
                st.integers(0, 1),
            ),
            min_size=2,
            max_size=5,
        )
    )
    def concurrently(self, calls: list[tuple[str, str, int, int]]) -> None:
        """Several calls at once: the order they are handled in is unknown, so what
        is learnt only from answers that hold in any order."""
        requests = [
            self.request(kind, saga, epoch, variant) for kind, saga, epoch, variant in calls
        ]
        outcomes = self.deliver(requests)
        # In any order: repeats agree with each other, and the checks below hold.
        for key in {request_key(r.saga_id) for r in requests}:  # type: ignore[attr-defined]
            answers = {
                (o.reply.ok, o.reply.output, o.reply.error)
                for r, o in zip(requests, outcomes, strict=True)
                if self.kind(r) == EXECUTE
                and request_key(r.saga_id) == key  # type: ignore[attr-defined]
                and o.reply is not None
            }
            assert len(answers) <= 1, f"{key}: different answers at once: {answers}"
        # Learn nothing order-dependent: the batch's effects are checked by the invariants.
        for req, outcome in zip(requests, outcomes, strict=True):
            if outcome.reply is None:
                continue
            saga = req.saga_id  # type: ignore[attr-defined]
            self.model.epoch[saga] = max(self.model.epoch.get(saga, 0), req.epoch)  # type: ignore[attr-defined]
            key = request_key(saga)
            if self.kind(req) == EXECUTE:
                known = self.model.first_answer.get(key)
                assert known is None or outcome.reply == known
                self.model.first_answer.setdefault(key, outcome.reply)
            else:
                self.model.compensated.add(key)

    @rule(
        kind=st.sampled_from((EXECUTE, COMPENSATE)),
        saga=st.sampled_from(SAGAS),
        epoch=EPOCHS,
        variant=st.integers(0, 1),
    )
    def crash_inside_the_handler(self, kind: str, saga: str, epoch: int, variant: int) -> None:
        """The process dies mid-handler, after its writes, before the commit; then
        it restarts on the same database."""
        req = self.request(kind, saga, epoch, variant)
        self.faults.crash = True
        try:
            outcomes = self.deliver([req])
        except Crash:
            pass  # nothing it did was committed
        else:  # the ledger answered without the handler (a repeat, a tombstone...)
            self.check([req], outcomes, lost=True)
        finally:
            self.faults.crash = False
        self.restart()

    @rule(
        kind=st.sampled_from((EXECUTE, COMPENSATE)),
        saga=st.sampled_from(SAGAS),
        epoch=EPOCHS,
        variant=st.integers(0, 1),
    )
    def handler_fails(self, kind: str, saga: str, epoch: int, variant: int) -> None:
        req = self.request(kind, saga, epoch, variant)
        self.faults.fail = True
        try:
            outcomes = self.deliver([req])
        finally:
            self.faults.fail = False
        self.check([req], outcomes)

    @rule(
        kind=st.sampled_from((EXECUTE, COMPENSATE)),
        saga=st.sampled_from(SAGAS),
        epoch=EPOCHS,
        variant=st.integers(0, 1),
    )
    def reply_lost(self, kind: str, saga: str, epoch: int, variant: int) -> None:
        """Committed, then the reply never reached the coordinator: it knows nothing
        new (but the participant must stay consistent with what it did)."""
        req = self.request(kind, saga, epoch, variant)
        outcomes = self.deliver([req])
        self.check([req], outcomes, lost=True)

    @precondition(lambda self: self.attempts > 0)
    @rule()
    def restart(self) -> None:
        self.p.close()
        self.p = build(self.db_path, self.faults, self.use_async)

    # ---- invariants on the database ---------------------------------------------------------

    @invariant()
    def guarantees_hold(self) -> None:
        with sqlite3.connect(self.db_path) as db:
            effects = db.execute("SELECT request_key, state FROM effects").fetchall()
            undos = db.execute("SELECT request_key, booked FROM undos").fetchall()
        keys = [k for k, _ in effects]
        assert len(keys) == len(set(keys)), f"a request took effect twice: {effects}"
        assert all(state != "refused-but-written" for _, state in effects), "a refusal kept writes"
        undone = [k for k, _ in undos]
        assert len(undone) == len(set(undone)), f"a compensation ran twice: {undos}"
        state_of = dict(effects)
        for key in self.model.compensated:
            assert state_of.get(key) in (None, "undone"), f"{key} in effect after compensation"
        ledger = read_ledger(self.db_path)
        for key, reply in self.model.first_answer.items():
            if reply.ok and key not in self.model.compensated:
                assert ledger.requests[key].output == reply.output
                assert state_of.get(key) in ("done", "undone")
        for key, booked in undos:  # the compensation saw the request's real output
            if booked is not None:
                assert booked == ledger.requests[key].output


class AsyncParticipantMachine(ParticipantMachine):
    use_async = True


MACHINE_SETTINGS = settings(
    max_examples=int(os.environ.get("SDK_EXAMPLES", "60")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestParticipantGuarantees = ParticipantMachine.TestCase
TestParticipantGuarantees.settings = MACHINE_SETTINGS
TestAsyncParticipantGuarantees = AsyncParticipantMachine.TestCase
TestAsyncParticipantGuarantees.settings = MACHINE_SETTINGS


# ---- edges a handler author meets --------------------------------------------------------


def test_unknown_actions_refuse_requests_and_retry_compensations(tmp_path) -> None:
    p = Participant("Test", str(tmp_path / "p.sqlite"))
    outcome = p.handle(EXECUTE, step_request(EXECUTE, "s0", 1, 1))
    assert outcome.reply is not None and not outcome.reply.ok
    assert "no handler for request 'Book'" in outcome.reply.error
    # Its compensation has nothing to undo: no handler needed.
    assert p.handle(COMPENSATE, step_request(COMPENSATE, "s0", 1, 1)).answer == ANSWER_OK
    # One for a request that never arrived needs the handler: retried until deployed.
    undo = p.handle(COMPENSATE, step_request(COMPENSATE, "s1", 1, 1))
    assert undo.answer == ANSWER_ERROR and "no handler for compensation" in undo.detail
    p.close()


@pytest.mark.parametrize(
    "returned,why",
    [("text", "not bytes"), (b"x" * (64 * 1024 + 1), "the limit is 65536")],
)
def test_a_bad_output_keeps_nothing_and_is_retried(tmp_path, returned, why) -> None:
    p = Participant("Test", str(tmp_path / "p.sqlite"), schema=SCHEMA)

    @p.request("Book")
    def book(step: Step) -> object:
        step.db.execute("INSERT INTO effects VALUES (?, 'done')", (step.request_key,))
        return returned

    outcome = p.handle(EXECUTE, step_request(EXECUTE, "s1", 1, 1))
    assert outcome.answer == ANSWER_ERROR and why in outcome.detail
    p.close()
    assert read_ledger(str(tmp_path / "p.sqlite")).requests == {}


def test_requests_without_keys_are_invalid(tmp_path) -> None:
    p = Participant("Test", str(tmp_path / "p.sqlite"))
    bad = participant_pb2.StepRequest(saga_id="s", vertex="V", action="Book")
    assert p.handle(EXECUTE, bad).answer == ANSWER_INVALID
    bad_undo = participant_pb2.StepRequest(saga_id="s", action="Cancel", idempotency_key="c")
    assert "request_key" in p.handle(COMPENSATE, bad_undo).detail
    p.close()


def test_an_async_handler_on_the_blocking_server_is_an_error_not_a_hang(tmp_path) -> None:
    p = Participant("Test", str(tmp_path / "p.sqlite"))

    @p.request("Book")
    async def book(step: Step) -> bytes:
        return b"never"

    outcome = p.handle(EXECUTE, step_request(EXECUTE, "s1", 1, 1))
    assert outcome.answer == ANSWER_ERROR and "serve_async" in outcome.detail
    p.close()


# ---- the README's example, as written ------------------------------------------------------


def readme_participant() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- participant-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no participant example"
    return match.group(1)


def test_readme_participant_is_short_and_honours_the_contract(tmp_path) -> None:
    code = readme_participant()
    assert len(code.strip().splitlines()) < 30
    [port] = free_ports(1)
    script = tmp_path / "hotel.py"
    script.write_text(code.replace("127.0.0.1:50061", f"127.0.0.1:{port}"))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")])},
    )
    try:
        with channel_to(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            stub = participant_pb2_grpc.ParticipantStub(channel)

            def call(kind: str, saga: str, action: str, epoch: int = 1) -> object:
                req = step_request(kind, saga, epoch, 1)
                req.action = action
                method = stub.Execute if kind == EXECUTE else stub.Compensate
                return method(req, timeout=10)

            booked = call(EXECUTE, "trip-1", "BookHotel")
            assert booked.ok and booked.output
            assert call(EXECUTE, "trip-1", "BookHotel") == booked  # a retry: same answer
            assert call(COMPENSATE, "trip-1", "CancelHotel").ok
            assert call(COMPENSATE, "trip-2", "CancelHotel").ok  # before its request
            late = call(EXECUTE, "trip-2", "BookHotel")
            assert not late.ok and late.error == LATE_REQUEST_ERROR
            with pytest.raises(grpc.RpcError) as stale:
                call(EXECUTE, "trip-1", "BookHotel", epoch=0)
            assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            refused = [call(EXECUTE, f"full-{i}", "BookHotel") for i in range(12)]
            assert not refused[-1].ok and refused[-1].error  # the example's rooms ran out
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        print(out.decode(errors="replace"))  # shown if the test failed
    assert proc.returncode == 0, "the example did not stop cleanly on SIGTERM"


def test_a_compensation_return_value_is_ignored(tmp_path) -> None:
    p = Participant("Test", str(tmp_path / "p.sqlite"))

    @p.compensation("Cancel")
    def cancel(step: Step, booked: bytes | None) -> object:
        return 42  # not bytes: means nothing for a compensation

    undo = p.handle(COMPENSATE, step_request(COMPENSATE, "s1", 1, 1))
    assert undo.reply is not None and undo.reply.ok
    p.close()


def test_an_invalid_call_does_not_block_the_loop_while_a_handler_awaits(tmp_path) -> None:
    """An async handler holds the ledger across its await; an invalid call recorded
    meanwhile must wait its turn on the loop, not block the loop's thread."""
    p = Participant("Test", str(tmp_path / "p.sqlite"), record_calls=True)

    async def scenario() -> list[str]:
        gate = asyncio.Event()

        @p.request("Book")
        async def book(step: Step) -> bytes:
            await gate.wait()
            return b"ok"

        valid = asyncio.create_task(p.handle_async(EXECUTE, step_request(EXECUTE, "s1", 1, 1)))
        await asyncio.sleep(0)  # the handler now holds the ledger, awaiting the gate
        bad = participant_pb2.StepRequest(saga_id="s1", vertex="V", action="Book")
        invalid = asyncio.create_task(p.handle_async(EXECUTE, bad))
        await asyncio.sleep(0)
        gate.set()
        done = await asyncio.wait_for(asyncio.gather(valid, invalid), timeout=10)
        return [o.answer for o in done]

    assert asyncio.run(scenario()) == [ANSWER_OK, ANSWER_INVALID]
    assert [c.answer for c in read_ledger(str(tmp_path / "p.sqlite")).calls] == [
        ANSWER_OK,
        ANSWER_INVALID,
    ]
    p.close()

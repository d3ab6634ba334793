"""The travel-booking saga and its four participants as local processes.

`travel_definition` is the saga from the talk: book a hotel, a car and a flight in
parallel, then charge the payment. `TravelParticipants` runs one real
`saga-participant` process per service on free loopback ports, so that demos,
tests and benches can kill, restart and misconfigure participants (fault knobs)
the way real services fail. Like `cluster.testkit.launcher`, it ends only the processes
it started, by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

import grpc
from saga.v1 import log_pb2

from cluster.grpcutil import channel_to
from cluster.testkit.booking import ParticipantState, db_path_for, read_state
from cluster.testkit.launcher import free_ports, stop_processes
from cluster.tls import dev_files

TRAVEL_SERVICES = ("Hotel", "Car", "Flight", "Payment")

# Each vertex's (request, compensation) action names.
TRAVEL_ACTIONS = {
    "Hotel": ("BookHotel", "CancelHotel"),
    "Car": ("BookCar", "CancelCar"),
    "Flight": ("BookFlight", "CancelFlight"),
    "Payment": ("Charge", "Refund"),
}
_PARALLEL = ("Hotel", "Car", "Flight")

BACKOFF_INITIAL_MS = 50
BACKOFF_MAX_MS = 1000
BACKOFF_MULTIPLIER = 2.0


def travel_definition(
    endpoints: Mapping[str, str], timeout_ms: int = 2000, max_attempts: int = 3
) -> log_pb2.SagaDefinition:
    """Hotel, Car and Flight in parallel (no dependencies), then Payment after all
    three: payment is the step hardest to undo, so it goes last."""
    missing = [s for s in TRAVEL_SERVICES if s not in endpoints]
    extra = sorted(set(endpoints) - set(TRAVEL_SERVICES))
    if missing or extra:
        raise ValueError(
            f"travel endpoints: need exactly {list(TRAVEL_SERVICES)}; "
            f"missing {missing}, unknown {extra}"
        )
    if timeout_ms <= 0:
        raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    vertices = []
    for name in TRAVEL_SERVICES:
        request, compensation = TRAVEL_ACTIONS[name]
        vertices.append(
            log_pb2.Vertex(
                name=name,
                endpoint=endpoints[name],
                request=request,
                compensation=compensation,
                depends_on=list(_PARALLEL) if name == "Payment" else [],
                timeout_ms=timeout_ms,
                max_attempts=max_attempts,
                backoff=log_pb2.Backoff(
                    initial_ms=BACKOFF_INITIAL_MS,
                    max_ms=BACKOFF_MAX_MS,
                    multiplier=BACKOFF_MULTIPLIER,
                ),
            )
        )
    return log_pb2.SagaDefinition(name="travel", vertices=vertices)


class TravelParticipants:
    """One booking participant process per travel service, on loopback.

    Each service keeps its port for the object's lifetime (a restarted participant
    comes back where the saga definitions point) and its database and log in
    `base_dir` (`<name>.sqlite`, `<name>.log`). `extra_args` holds per-service
    flags, typically fault knobs, e.g. {"Car": ["--refuse-saga-substring", "nocar"]}.
    Use as a context manager to start (and wait for) all and stop all."""

    def __init__(
        self,
        base_dir: str,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        host: str = "127.0.0.1",
        services: Sequence[str] = TRAVEL_SERVICES,
        tls_dir: str | None = None,
    ) -> None:
        """`tls_dir`: serve TLS with the development certificates there
        (cluster.tls.make_dev_certs; LocalCluster(tls=True) writes them)."""
        unknown = sorted(set(extra_args or {}) - set(services))
        if unknown:
            raise ValueError(f"extra_args for unknown services {unknown}; have {list(services)}")
        self.base_dir = os.path.abspath(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        self.services = tuple(services)
        ports = free_ports(len(self.services), host)
        self._endpoints = {
            name: f"{host}:{port}" for name, port in zip(self.services, ports, strict=True)
        }
        self.extra_args = {name: list((extra_args or {}).get(name, ())) for name in self.services}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._tls_dir = tls_dir
        self.tls = dev_files(tls_dir, "participant") if tls_dir else None

    def __enter__(self) -> TravelParticipants:
        try:
            self.start_all()
            self.wait_ready()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    @property
    def endpoints(self) -> dict[str, str]:
        """Service name -> HOST:PORT (what `travel_definition` takes)."""
        return dict(self._endpoints)

    def db_path(self, name: str) -> str:
        return db_path_for(self.base_dir, name)

    def log_path(self, name: str) -> str:
        return os.path.join(self.base_dir, f"{name}.log")

    def state(self, name: str) -> ParticipantState:
        """The service's durable state (readable whether it runs or not)."""
        return read_state(self.db_path(name))

    # ---- processes ---------------------------------------------------------------------

    def command(self, name: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cluster.testkit.booking",
            "--name",
            name,
            "--addr",
            self._endpoints[name],
            "--data-dir",
            self.base_dir,
            *(
                [
                    *("--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)),
                    # Only the nodes (certificates from the same CA) may call.
                    *("--tls-ca", str(self.tls.ca), "--tls-require-client-cert"),
                ]
                if self.tls
                else []
            ),
            *self.extra_args[name],
        ]

    def start(self, name: str, detach: bool = False) -> None:
        """Start one participant; `detach` puts it in its own session so that it
        outlives the command that started it (`sagactl travel up`)."""
        if self.alive(name):
            raise RuntimeError(
                f"participant {name} is already running (pid {self.procs[name].pid})"
            )
        with open(self.log_path(name), "ab") as log:
            self.procs[name] = subprocess.Popen(
                self.command(name), stdout=log, stderr=subprocess.STDOUT, start_new_session=detach
            )

    def start_all(self, detach: bool = False) -> None:
        for name in self.services:
            self.start(name, detach)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return None if proc is None else proc.pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (default SIGKILL: a crash) and, for KILL/TERM, reap the process."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                proc.wait(timeout=15)

    def restart(self, name: str, extra_args: Sequence[str] | None = None) -> None:
        """Kill -9 (if running) and start again on the same port and database.
        `extra_args` replaces the service's flags (e.g. to drop a crash knob).
        Does not wait: call `wait_ready([name])`."""
        self.kill(name)
        if extra_args is not None:
            self.extra_args[name] = list(extra_args)
        self.start(name)

    def wait_ready(self, timeout_s: float = 15.0, names: Sequence[str] | None = None) -> None:
        """Block until each participant accepts gRPC connections. Raises RuntimeError
        (with its log) if one exits, TimeoutError if one is not ready in time."""
        deadline = time.monotonic() + timeout_s
        for name in names if names is not None else self.services:
            # Probe as a node would: the participants take only the nodes' certificates.
            probe = dev_files(self._tls_dir, "node") if self._tls_dir else None
            with channel_to(self._endpoints[name], probe) as channel:
                ready = grpc.channel_ready_future(channel)
                try:
                    while True:
                        proc = self.procs.get(name)
                        if proc is None or proc.poll() is not None:
                            code = None if proc is None else proc.returncode
                            raise RuntimeError(
                                f"participant {name} is not running (exit {code}):\n"
                                + self._tail(name, 30)
                            )
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise TimeoutError(
                                f"participant {name} at {self._endpoints[name]} not ready "
                                f"within {timeout_s}s:\n" + self._tail(name, 30)
                            )
                        try:
                            ready.result(timeout=min(0.2, remaining))
                            break
                        except grpc.FutureTimeoutError:
                            continue
                finally:
                    ready.cancel()

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every participant we started; SIGKILL what still runs at the deadline."""
        stop_processes(self.procs.values(), timeout_s)

    def logs(self, tail_lines: int = 60) -> str:
        """The end of every participant's log, for a failed test's report."""
        return "\n".join(
            f"===== {name} ({self.log_path(name)}) =====\n" + self._tail(name, tail_lines)
            for name in self.services
        )

    def _tail(self, name: str, lines: int) -> str:
        try:
            with open(self.log_path(name), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)\n"

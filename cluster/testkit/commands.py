"""`sagactl` commands that start processes: local clusters, the travel
participants, and chaos runs. `sagactl` finds them through the `sagactl.commands`
entry point (pyproject.toml), so the client never imports the test kit.

sagactl cluster up [--nodes 3|5] [--groups N] [--dir DIR]
                                                  start a local cluster in the background
sagactl cluster down [--dir DIR]                  stop the local cluster's processes
sagactl travel up|down [--dir DIR]                the four travel participants
sagactl chaos --seed N [--duration S] [--nodes 3|5]   faults under load, then the checker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from rich.progress import Progress

from cluster.client.sagactl import CONSOLE, DEFAULT_DIR, status_table
from cluster.localstate import STATE_FILE, group_dirs
from cluster.testkit.groups import ShardedCluster
from cluster.testkit.launcher import LocalCluster, NodeSpec, load_state
from cluster.testkit.rolling import pid_alive
from cluster.testkit.travel import TravelParticipants, travel_definition

# Each group is 3 or 5 node processes on this machine.
MAX_LOCAL_GROUPS = 8


def add_commands(top: Any, cluster: Any) -> None:
    """Add `cluster up|down`, `travel` and `chaos` to sagactl's parser (`top`: its
    subparsers; `cluster`: the `cluster` group's)."""
    up = cluster.add_parser("up", help="start a local cluster on loopback, in the background")
    up.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    up.add_argument("--dir", default=DEFAULT_DIR, help="data and logs (default %(default)s)")
    up.add_argument(
        "--groups",
        type=int,
        default=1,
        help="Raft groups, each with its own nodes, leader and Saga Log; sagas are spread "
        f"over them by id (default 1, at most {MAX_LOCAL_GROUPS})",
    )
    up.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for a leader")
    up.set_defaults(func=cmd_up)

    rolling = cluster.add_parser(
        "rolling-restart",
        help="restart every node of the local cluster in turn, the leader last after "
        "handing leadership to a caught-up follower",
    )
    rolling.add_argument("--dir", default=DEFAULT_DIR)
    rolling.set_defaults(func=cmd_rolling_restart)

    down = cluster.add_parser("down", help="stop the local cluster")
    down.add_argument("--dir", default=DEFAULT_DIR)
    down.set_defaults(func=cmd_down)

    chaos = top.add_parser("chaos", help="a seeded fault schedule under load, then the checker")
    chaos.add_argument("--duration", type=float, default=120.0, help="seconds of faults")
    chaos.add_argument("--seed", type=int, required=True)
    chaos.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    chaos.add_argument("--clients", type=int, default=4)
    chaos.add_argument("--rate", type=float, default=60.0, help="sagas submitted per second")
    chaos.add_argument(
        "--dir", help="keep data and logs here (default: temporary, kept on failure)"
    )
    chaos.add_argument("--json", help="also write the verdict and summary to this file")
    chaos.set_defaults(func=cmd_chaos)

    travel = top.add_parser("travel", help="the travel-booking participants, for trying it out")
    tsub = travel.add_subparsers(dest="command", required=True)
    for name, func, text in [
        ("up", cmd_travel_up, "start Hotel, Car, Flight and Payment; write travel.yaml"),
        ("down", cmd_travel_down, "stop them"),
    ]:
        c = tsub.add_parser(name, help=text)
        c.add_argument("--dir", default=DEFAULT_DIR)
        c.set_defaults(func=func)


def cmd_up(args: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(args.dir, STATE_FILE)):
        alive = [s for s in local_nodes(args.dir) if s.pid and pid_alive(s.pid)]
        if alive:
            print(
                f"sagactl: a cluster is already running in {args.dir!r} "
                f"(pids {[s.pid for s in alive]}); `sagactl cluster down` first",
                file=sys.stderr,
            )
            return 1
    if not 1 <= args.groups <= MAX_LOCAL_GROUPS:
        print(f"sagactl: --groups must be 1..{MAX_LOCAL_GROUPS}", file=sys.stderr)
        return 2
    cluster: LocalCluster | ShardedCluster
    if args.groups == 1:
        cluster = LocalCluster(args.dir, nodes=args.nodes, http=True)
    else:
        cluster = ShardedCluster(args.dir, args.groups, nodes=args.nodes, http=True)
    groups = cluster.groups if isinstance(cluster, ShardedCluster) else [cluster]
    started = time.monotonic()
    cluster.start_all(detach=True)
    for i, group in enumerate(groups):
        try:
            leader = group.wait_for_leader(timeout_s=args.timeout)
        except TimeoutError as exc:
            print(f"sagactl: {exc}\n{group.logs(20)}", file=sys.stderr)
            return 1
        print(
            (f"group {i}: " if len(groups) > 1 else "")
            + f"leader {leader.id} (term {leader.term}, epoch {leader.epoch}) elected in "
            f"{time.monotonic() - started:.2f}s"
        )
    print(f"data and logs in {cluster.base_dir}\n")
    CONSOLE.print(status_table([s.grpc_addr for g in groups for s in g.specs.values()]))
    for spec in (s for g in groups for s in g.specs.values()):
        print(
            f"{spec.id}: web page http://{spec.http_addr}/  metrics http://{spec.http_addr}/metrics"
        )
    return 0


def cmd_rolling_restart(args: argparse.Namespace) -> int:
    from cluster.testkit.rolling import Detached, RollingRestartFailed, rolling_restart

    try:
        for group_dir in group_dirs(args.dir):  # one group at a time
            order = rolling_restart(Detached(group_dir, tls=None, metadata=[]))
            print(f"restarted {', '.join(order)}")
    except (RollingRestartFailed, FileNotFoundError, grpc.RpcError) as exc:
        print(f"sagactl: rolling restart failed: {exc}", file=sys.stderr)
        return 1
    return 0


def local_nodes(base_dir: str) -> list[NodeSpec]:
    """Every node of the local cluster in `base_dir`, as its group's state file
    has it now (a rolling restart gives nodes new pids there)."""
    return [spec for group in group_dirs(base_dir) for spec in load_state(group)]


def cmd_down(args: argparse.Namespace) -> int:
    specs = local_nodes(args.dir)
    for spec in specs:
        if spec.pid and pid_alive(spec.pid):
            os.kill(spec.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for spec in specs:
        while spec.pid and pid_alive(spec.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if spec.pid and pid_alive(spec.pid):
            os.kill(spec.pid, signal.SIGKILL)
    print(f"stopped {len(specs)} nodes")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from cluster.testkit import chaos

    base = args.dir or tempfile.mkdtemp(prefix=f"chaos-{args.seed}-")
    with Progress(console=CONSOLE, transient=True) as progress:
        # The bar follows the fault schedule's clock; the run's own lines print above it.
        task = progress.add_task(f"chaos seed {args.seed}", total=args.duration)
        started = time.monotonic()
        done = threading.Event()

        def tick() -> None:
            while not done.wait(0.5):
                progress.update(task, completed=min(args.duration, time.monotonic() - started))

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            verdict, summary = chaos.run(
                base,
                duration_s=args.duration,
                seed=args.seed,
                nodes=args.nodes,
                clients=args.clients,
                rate_per_s=args.rate,
                log=lambda text: progress.console.print(text, markup=False, highlight=False),
            )
        finally:
            done.set()
            ticker.join()
    print(verdict.report())
    print("summary:")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "ok": verdict.ok,
                    "summary": summary,
                    "counts": verdict.counts,
                    "problems": verdict.problems,
                },
                f,
                indent=2,
            )
    if verdict.ok and not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    elif not verdict.ok:
        print(f"data and logs kept in {base}")
    return 0 if verdict.ok else 1


TRAVEL_STATE = "travel.json"


def cmd_travel_up(args: argparse.Namespace) -> int:
    base = os.path.join(args.dir, "participants")
    parts = TravelParticipants(base)
    parts.start_all(detach=True)
    try:
        parts.wait_ready(timeout_s=15)
    except Exception as exc:
        parts.stop_all()
        print(f"sagactl: participants did not start: {exc}", file=sys.stderr)
        return 1
    with open(os.path.join(args.dir, TRAVEL_STATE), "w") as f:
        json.dump({n: parts.pid(n) for n in parts.services}, f)
    definition = travel_definition(parts.endpoints)
    path = os.path.join(args.dir, "travel.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(
            json_format.MessageToDict(definition, preserving_proto_field_name=True),
            f,
            sort_keys=False,
        )
    for name, endpoint in parts.endpoints.items():
        print(f"{name:8} {endpoint}  (data and log in {base})")
    print(f"\nthe travel saga is in {path}:\n  sagactl saga submit {path} --watch")
    return 0


def cmd_travel_down(args: argparse.Namespace) -> int:
    with open(os.path.join(args.dir, TRAVEL_STATE)) as f:
        pids = json.load(f)
    for pid in pids.values():
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
    print(f"stopped {len(pids)} participants")
    return 0

"""`sagactl`: the command-line tool for a saga cluster.

sagactl cluster up [--nodes 3|5] [--dir DIR]      start a local cluster in the background
sagactl cluster status [--dir DIR | --addr H:P]   the cluster as a table
sagactl cluster down [--dir DIR]                  stop the local cluster's processes
sagactl cluster forget-node --id ID [...]         let a wiped node rejoin
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc

from cluster.grpcutil import channel_to
from cluster.launcher import LocalCluster, load_state

DEFAULT_DIR = "sagacluster-data"
ROLE_NAMES = {
    cluster_pb2.FOLLOWER: "follower",
    cluster_pb2.CANDIDATE: "candidate",
    cluster_pb2.LEADER: "leader",
}


def _addresses(args: argparse.Namespace) -> list[str]:
    if args.addr:
        return [args.addr]
    try:
        return [spec.grpc_addr for spec in load_state(args.dir)]
    except FileNotFoundError:
        raise SystemExit(
            f"sagactl: no cluster in {args.dir!r} (start one with `sagactl cluster up`, "
            "or pass --addr HOST:PORT)"
        ) from None


def _status(addr: str, timeout_s: float = 1.0) -> cluster_pb2.StatusReply | None:
    try:
        with channel_to(addr) as channel:
            return cluster_pb2_grpc.ClusterStub(channel).Status(
                cluster_pb2.StatusRequest(), timeout=timeout_s
            )
    except grpc.RpcError:
        return None


def status_table(addrs: list[str]) -> str:
    """Every node's own view, one row each; the members come from the first answer."""
    first = next((r for r in (_status(a) for a in addrs) if r is not None), None)
    if first is not None:
        addrs = [m.grpc_addr for m in first.members]
    header = ("ID", "ROLE", "TERM", "EPOCH", "LEADER", "COMMIT", "APPLIED", "RAFT", "GRPC")
    rows = [header]
    for addr in addrs:
        r = _status(addr)
        if r is None:
            rows.append(("?", "unreachable", "", "", "", "", "", "", addr))
            continue
        raft_addr = next((m.raft_addr for m in r.members if m.id == r.id), "")
        rows.append(
            (
                r.id,
                ROLE_NAMES.get(r.role, "?"),
                str(r.term),
                str(r.epoch),
                r.leader_id or "-",
                str(r.commit_index),
                str(r.applied_index),
                raft_addr,
                addr,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def cmd_up(args: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(args.dir, "cluster.json")):
        alive = [s for s in load_state(args.dir) if s.pid and _pid_alive(s.pid)]
        if alive:
            print(
                f"sagactl: a cluster is already running in {args.dir!r} "
                f"(pids {[s.pid for s in alive]}); `sagactl cluster down` first",
                file=sys.stderr,
            )
            return 1
    cluster = LocalCluster(args.dir, nodes=args.nodes)
    started = time.monotonic()
    cluster.start_all(detach=True)
    try:
        leader = cluster.wait_for_leader(timeout_s=args.timeout)
    except TimeoutError as exc:
        print(f"sagactl: {exc}\n{cluster.logs(20)}", file=sys.stderr)
        return 1
    print(
        f"leader {leader.id} (term {leader.term}, epoch {leader.epoch}) elected in "
        f"{time.monotonic() - started:.2f}s; data and logs in {cluster.base_dir}\n"
    )
    print(status_table([s.grpc_addr for s in cluster.specs.values()]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(status_table(_addresses(args)))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    specs = load_state(args.dir)
    for spec in specs:
        if spec.pid and _pid_alive(spec.pid):
            os.kill(spec.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for spec in specs:
        while spec.pid and _pid_alive(spec.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if spec.pid and _pid_alive(spec.pid):
            os.kill(spec.pid, signal.SIGKILL)
    print(f"stopped {len(specs)} nodes")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    for addr in _addresses(args):
        try:
            with channel_to(addr) as channel:
                reply = cluster_pb2_grpc.ClusterStub(channel).ForgetMember(
                    cluster_pb2.ForgetMemberRequest(node_id=args.id), timeout=10
                )
            print(
                f"node {args.id} forgotten; start it with an empty data directory to re-add it"
                if not reply.result.reason
                else reply.result.reason
            )
            return 0
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
    print(f"sagactl: forget-node failed: {last}", file=sys.stderr)
    return 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child not yet reaped) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sagactl", description="Control a saga cluster.")
    top = p.add_subparsers(dest="group", required=True)
    cluster = top.add_parser("cluster", help="run and inspect a cluster")
    sub = cluster.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local cluster on loopback, in the background")
    up.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    up.add_argument("--dir", default=DEFAULT_DIR, help="data and logs (default %(default)s)")
    up.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for a leader")
    up.set_defaults(func=cmd_up)

    for name, func, text in [
        ("status", cmd_status, "show every node's view as a table"),
        ("down", cmd_down, "stop the local cluster"),
    ]:
        c = sub.add_parser(name, help=text)
        c.add_argument("--dir", default=DEFAULT_DIR)
        if name == "status":
            c.add_argument("--addr", help="HOST:PORT of any node's gRPC server")
        c.set_defaults(func=func)

    forget = sub.add_parser("forget-node", help="unregister a node whose data directory was wiped")
    forget.add_argument("--id", required=True)
    forget.add_argument("--dir", default=DEFAULT_DIR)
    forget.add_argument("--addr", help="HOST:PORT of any running node's gRPC server")
    forget.set_defaults(func=cmd_forget)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

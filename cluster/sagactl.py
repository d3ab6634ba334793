"""`sagactl`: the command-line tool for a saga cluster.

sagactl cluster up [--nodes 3|5] [--dir DIR]      start a local cluster in the background
sagactl cluster status [--dir DIR | --addr H:P]   the cluster as a table
sagactl cluster down [--dir DIR]                  stop the local cluster's processes
sagactl cluster forget-node --id ID [...]         let a wiped node rejoin
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import grpc
import yaml
from google.protobuf import json_format
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2, sagas_pb2

from cluster import auth
from cluster.client import SagaClient, client_tls
from cluster.grpcutil import channel_to
from cluster.launcher import LocalCluster, load_state
from cluster.tls import TlsFiles, make_dev_certs
from cluster.travel import TravelParticipants, travel_definition

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


def _status(
    addr: str, tls: TlsFiles | None, metadata: list[tuple[str, str]], timeout_s: float = 1.0
) -> cluster_pb2.StatusReply | None:
    try:
        with channel_to(addr, tls) as channel:
            return cluster_pb2_grpc.ClusterStub(channel).Status(
                cluster_pb2.StatusRequest(), timeout=timeout_s, metadata=metadata
            )
    except grpc.RpcError:
        return None


def status_table(
    addrs: list[str], tls: TlsFiles | None = None, metadata: list[tuple[str, str]] | None = None
) -> str:
    """Every node's own view, one row each; the members come from the first answer."""
    meta = metadata or []
    first = next((r for r in (_status(a, tls, meta) for a in addrs) if r is not None), None)
    if first is not None:
        addrs = [m.grpc_addr for m in first.members]
    header = ("ID", "ROLE", "TERM", "EPOCH", "LEADER", "COMMIT", "APPLIED", "RAFT", "GRPC")
    rows = [header]
    for addr in addrs:
        r = _status(addr, tls, meta)
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
            tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
            with channel_to(addr, tls) as channel:
                reply = cluster_pb2_grpc.ClusterStub(channel).ForgetMember(
                    cluster_pb2.ForgetMemberRequest(node_id=args.id),
                    timeout=10,
                    metadata=auth.bearer(_token(args)),
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


def _token(args: argparse.Namespace) -> str | None:
    """The caller's token: --token-file, else $SAGA_TOKEN (clusters with --auth-file)."""
    path = getattr(args, "token_file", None)
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("SAGA_TOKEN") or None


def _client(args: argparse.Namespace) -> SagaClient:
    addrs = args.addr.split(",") if args.addr else _addresses(args)
    return SagaClient(
        addrs,
        token=_token(args),
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def cmd_certs(args: argparse.Namespace) -> int:
    make_dev_certs(args.dir, args.host or ["127.0.0.1", "localhost"])
    print(
        f"wrote a development CA and certificates to {args.dir}: ca.pem; node, client and "
        "participant .pem/.key (keys mode 0600). For trying TLS out, not for production."
    )
    return 0


def cmd_add_token(args: argparse.Namespace) -> int:
    try:
        token = auth.add_token(args.auth_file, args.name, args.role)
    except (auth.AuthError, OSError) as exc:
        print(f"sagactl: {exc}", file=sys.stderr)
        return 1
    print(token)
    print(
        f"(the token of {args.name!r}, role {args.role}: shown once, only its hash is in "
        f"{args.auth_file})",
        file=sys.stderr,
    )
    return 0


def load_definition(path: str) -> log_pb2.SagaDefinition:
    """A saga definition from a YAML or JSON file (field names as in log.proto)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SystemExit(f"sagactl: {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SystemExit(f"sagactl: {path} must hold a mapping with 'name' and 'vertices'")
    try:
        return json_format.ParseDict(doc, log_pb2.SagaDefinition())
    except json_format.ParseError as exc:
        raise SystemExit(f"sagactl: {path}: {exc}") from None


def _payload(text: str | None) -> bytes:
    if text is None:
        return b""
    if text.startswith("@"):
        with open(text[1:], "rb") as f:
            return f.read()
    return text.encode()


def _describe(record: log_pb2.Record) -> str:
    body = record.WhichOneof("body") or "?"
    msg = getattr(record, body)
    fields = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    fields.pop("definition", None)
    if "payload" in fields:
        fields["payload"] = f"{len(msg.payload)} bytes"
    if "output" in fields:
        fields["output"] = msg.output.decode(errors="replace")
    detail = ", ".join(f"{k}={v}" for k, v in fields.items())
    return f"{body}({detail}) epoch={record.epoch}"


def _print_info(info: sagas_pb2.SagaInfo) -> None:
    print(f"saga {info.saga_id} ({info.name}): {sagas_pb2.SagaState.Name(info.state)}")
    if info.abort_reason:
        print(f"  abort reason: {info.abort_reason}")
    for v in info.vertices:
        line = f"  {v.name:12} {sagas_pb2.VertexState.Name(v.state):13} attempts={v.attempts}"
        if v.compensation_attempts:
            line += f" compensations={v.compensation_attempts}"
        if v.output:
            line += f" output={v.output.decode(errors='replace')}"
        if v.error:
            line += f" error={v.error}"
        print(line)


def _watch(client: SagaClient, saga_id: str, from_seq: int = 0) -> None:
    for event in client.watch(saga_id, from_seq):
        print(f"  [{event.seq:3}] {_describe(event.record)}", flush=True)


def cmd_submit(args: argparse.Namespace) -> int:
    definition = load_definition(args.file)
    with _client(args) as client:
        try:
            saga_id = client.submit(definition, _payload(args.payload), args.id)
        except grpc.RpcError as exc:
            print(f"sagactl: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        print(f"submitted saga {saga_id}")
        if args.watch:
            _watch(client, saga_id)
            _print_info(client.get(saga_id))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    definition = load_definition(args.file)
    with _client(args) as client:
        try:
            info = client.run(definition, _payload(args.payload), args.id, args.timeout)
        except grpc.RpcError as exc:
            print(f"sagactl: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"sagactl: {exc}", file=sys.stderr)
            return 1
    _print_info(info)
    return 0 if info.state == sagas_pb2.COMPLETED else 3


def cmd_saga(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            if args.command == "get":
                _print_info(client.get(args.saga_id))
                if args.records:
                    for i, record in enumerate(client.get(args.saga_id).records):
                        print(f"  [{i:3}] {_describe(record)}")
            elif args.command == "list":
                state = sagas_pb2.SagaState.Value(args.state) if args.state else 0
                for summary in client.list(state=state):
                    name = sagas_pb2.SagaState.Name(summary.state)
                    print(f"{summary.saga_id}  {name:10} {summary.name}")
            elif args.command == "watch":
                _watch(client, args.saga_id, args.from_seq)
            elif args.command == "abort":
                client.abort(args.saga_id, args.reason)
                print(f"saga {args.saga_id}: abort requested")
            elif args.command == "resolve":
                client.resolve(args.saga_id, args.vertex, args.reason)
                print(f"saga {args.saga_id}: {args.vertex} marked compensated")
        except grpc.RpcError as exc:
            print(f"sagactl: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from cluster import chaos

    base = args.dir or tempfile.mkdtemp(prefix=f"chaos-{args.seed}-")
    verdict, summary = chaos.run(
        base,
        duration_s=args.duration,
        seed=args.seed,
        nodes=args.nodes,
        clients=args.clients,
        rate_per_s=args.rate,
    )
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
        if pid and _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
    print(f"stopped {len(pids)} participants")
    return 0


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
    forget.add_argument("--token-file", help="an admin token (default: $SAGA_TOKEN)")
    forget.add_argument("--tls-ca", help="talk TLS, trusting this PEM CA")
    forget.add_argument("--tls-cert", help="client certificate (nodes with mutual TLS)")
    forget.add_argument("--tls-key", help="the client certificate's key")
    forget.set_defaults(func=cmd_forget)

    certs = top.add_parser("certs", help="development TLS certificates")
    certs_sub = certs.add_subparsers(dest="command", required=True)
    certs_init = certs_sub.add_parser("init", help="a development CA and certificates in DIR")
    certs_init.add_argument("dir")
    certs_init.add_argument(
        "--host", action="append", help="a name or IP the nodes and participants serve on"
    )
    certs_init.set_defaults(func=cmd_certs)

    auth_cmd = top.add_parser("auth", help="tokens for clusters that run with --auth-file")
    auth_sub = auth_cmd.add_subparsers(dest="command", required=True)
    add_token = auth_sub.add_parser("add-token", help="make a token; print it once")
    add_token.add_argument("--auth-file", required=True, help="created with mode 0600")
    add_token.add_argument("--name", required=True, help="who holds it (shown in node logs)")
    add_token.add_argument("--role", required=True, choices=auth.ROLES)
    add_token.set_defaults(func=cmd_add_token)

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

    saga = top.add_parser("saga", help="submit and follow sagas")
    ssub = saga.add_subparsers(dest="command", required=True)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        c = ssub.add_parser(name, help=text)
        c.add_argument("--dir", default=DEFAULT_DIR)
        c.add_argument("--addr", help="HOST:PORT[,HOST:PORT...] of any nodes")
        c.add_argument("--token-file", help="the caller's token (default: $SAGA_TOKEN)")
        c.add_argument("--tls-ca", help="talk TLS, trusting this PEM CA")
        c.add_argument("--tls-cert", help="client certificate (nodes with mutual TLS)")
        c.add_argument("--tls-key", help="the client certificate's key")
        c.set_defaults(func=cmd_saga)
        return c

    submit = add("submit", "submit a saga from a YAML or JSON definition")
    submit.add_argument("file")
    submit.add_argument("--payload", help="the payload, or @FILE")
    submit.add_argument("--id", help="the saga id (default: generated)")
    submit.add_argument("--watch", action="store_true", help="follow it live until it ends")
    submit.set_defaults(func=cmd_submit)
    run = add("run", "submit a saga and wait until it ends (exit 0 COMPLETED, 3 ABORTED)")
    run.add_argument("file")
    run.add_argument("--payload", help="the payload, or @FILE")
    run.add_argument("--id", help="the saga id (default: generated); run it again to re-attach")
    run.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the end")
    run.set_defaults(func=cmd_run)
    get = add("get", "a saga's state and vertices")
    get.add_argument("saga_id")
    get.add_argument("--records", action="store_true", help="also print its log records")
    lst = add("list", "sagas, optionally in one state")
    lst.add_argument(
        "--state", choices=[n for n in sagas_pb2.SagaState.keys() if "UNSPEC" not in n]
    )
    watch = add("watch", "follow a saga's records live until it ends")
    watch.add_argument("saga_id")
    watch.add_argument("--from", dest="from_seq", type=int, default=0)
    abort = add("abort", "abort a running saga (its started vertices are compensated)")
    abort.add_argument("saga_id")
    abort.add_argument("--reason", default="")
    resolve = add("resolve", "mark a stuck compensation as done by hand")
    resolve.add_argument("saga_id")
    resolve.add_argument("--vertex", required=True)
    resolve.add_argument("--reason", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""`sagactl`: the command-line tool for a saga cluster (client side).

sagactl cluster status [--dir DIR | --addr H:P]   the cluster as a table
sagactl cluster forget-node --id ID [...]         let a wiped node rejoin
sagactl cluster add-node --id ID --raft-addr H:P --grpc-addr H:P   add a started node
sagactl cluster remove-node --id ID               remove a member
sagactl saga submit|run|get|list|watch|abort|resolve
sagactl certs init DIR; sagactl auth add-token
(`cluster up|down`, `travel` and `chaos` come from the test kit: testkit/commands.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from rich.console import Console, RenderableType
from rich.console import Group as RichGroup
from rich.live import Live
from rich.progress import MofNCompleteColumn, Progress
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2, sagas_pb2

from cluster import auth
from cluster.client import views
from cluster.client.saga_client import SagaClient, client_tls
from cluster.grpcutil import channel_to
from cluster.localstate import grpc_addresses
from cluster.shardmap import ShardMap
from cluster.tls import TlsFiles, make_dev_certs

DEFAULT_DIR = "sagacluster-data"
PLUGIN_GROUP = "sagactl.commands"
# Piped output (scripts, logs) gets tables wide enough not to wrap their cells.
CONSOLE = Console(width=None if sys.stdout.isatty() else 200)


def _addresses(args: argparse.Namespace) -> list[str]:
    """The nodes to ask: --addr's (comma-separated), else the local cluster's."""
    if args.addr:
        return args.addr.split(",")
    try:
        return grpc_addresses(args.dir)
    except FileNotFoundError:
        raise SystemExit(
            f"sagactl: no cluster in {args.dir!r} (start one with `sagactl cluster up`, "
            "or pass --addr HOST:PORT)"
        ) from None


def node_status(
    addr: str, tls: TlsFiles | None, metadata: list[tuple[str, str]], timeout_s: float = 1.0
) -> cluster_pb2.StatusReply | None:
    """One node's own Status (None: unreachable or refused)."""
    try:
        with channel_to(addr, tls) as channel:
            return cluster_pb2_grpc.ClusterStub(channel).Status(
                cluster_pb2.StatusRequest(), timeout=timeout_s, metadata=metadata
            )
    except grpc.RpcError:
        return None


def shard_map_of(
    addr: str, tls: TlsFiles | None, metadata: list[tuple[str, str]]
) -> ShardMap | None:
    """The cluster's shard map as the node at `addr` serves it (None: unreachable)."""
    try:
        with channel_to(addr, tls) as channel:
            reply = cluster_pb2_grpc.ClusterStub(channel).ShardMap(
                cluster_pb2.ShardMapRequest(), timeout=1.0, metadata=metadata
            )
    except grpc.RpcError:
        return None
    return ShardMap.from_reply(reply)


def status_table(
    addrs: list[str], tls: TlsFiles | None = None, metadata: list[tuple[str, str]] | None = None
) -> RenderableType:
    """Every node's own view, one row each, a table per Raft group; the members
    come from the first answer (and the groups from its shard map)."""
    meta = metadata or []
    first_addr, first = next(
        ((a, r) for a, r in ((a, node_status(a, tls, meta)) for a in addrs) if r is not None),
        (None, None),
    )
    several = first_addr is not None and first is not None and first.groups > 1
    shard_map = shard_map_of(first_addr, tls, meta) if several and first_addr else None
    if shard_map is None:
        if first is not None:
            addrs = [m.grpc_addr for m in first.members]
        return views.cluster_table([(addr, node_status(addr, tls, meta)) for addr in addrs])
    return RichGroup(
        *(
            views.cluster_table(
                [(addr, node_status(addr, tls, meta)) for addr in g.nodes],
                title=f"group {g.index} (hash {g.hash_start:#010x}-{g.hash_end - 1:#010x})",
            )
            for g in shard_map.groups
        )
    )


def cmd_status(args: argparse.Namespace) -> int:
    addrs = _addresses(args)
    tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    meta = auth.bearer(_token(args))
    if not args.watch:
        CONSOLE.print(status_table(addrs, tls, meta))
        return 0
    try:
        with Live(status_table(addrs, tls, meta), console=CONSOLE, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(status_table(addrs, tls, meta), refresh=True)
    except KeyboardInterrupt:
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


def on_leader(
    addrs: list[str],
    tls: TlsFiles | None,
    metadata: list[tuple[str, str]],
    method: str,
    request: Any,
    timeout_s: float,
) -> Any:
    """A Cluster call on the leader the nodes at `addrs` name, asked again where
    leadership moved meanwhile (or the leader died, or is taking office).
    grpc.RpcError for any other refusal; TimeoutError when no leader answered
    within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        replies = [r for r in (node_status(a, tls, metadata) for a in addrs) if r is not None]
        leader = next((r.leader_grpc_addr for r in replies if r.leader_grpc_addr), None)
        if leader is not None:
            with channel_to(leader, tls) as channel:
                try:
                    return getattr(cluster_pb2_grpc.ClusterStub(channel), method)(
                        request, timeout=timeout_s + 5, metadata=metadata
                    )
                except grpc.RpcError as exc:
                    moved = exc.code() == grpc.StatusCode.UNAVAILABLE or "not the leader" in (
                        exc.details() or ""
                    )
                    if not moved or time.monotonic() > deadline:
                        raise
            addrs = [leader, *(a for a in addrs if a != leader)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no leader answered {method} within {timeout_s:.0f} s")
        time.sleep(0.2)


def remove_member(
    addrs: list[str],
    tls: TlsFiles | None,
    metadata: list[tuple[str, str]],
    node_id: str,
    timeout_s: float,
) -> cluster_pb2.MembershipReply:
    """Cluster.RemoveNode through the leader; when the node to remove is the leader,
    it hands leadership over first (a leader never removes itself)."""
    timeout_ms = int(timeout_s * 1000)
    request = cluster_pb2.RemoveNodeRequest(node_id=node_id, timeout_ms=timeout_ms)
    try:
        return on_leader(addrs, tls, metadata, "RemoveNode", request, timeout_s)
    except grpc.RpcError as exc:
        if "transfer leadership first" not in (exc.details() or ""):
            raise
    transfer = cluster_pb2.TransferLeadershipRequest(timeout_ms=timeout_ms)
    on_leader(addrs, tls, metadata, "TransferLeadership", transfer, timeout_s)
    return on_leader(addrs, tls, metadata, "RemoveNode", request, timeout_s)


def _on_leader_or_exit(args: argparse.Namespace, call: Callable[..., Any], *rest: Any) -> Any:
    """`call(addrs, tls, metadata, *rest)` with the command's nodes and
    credentials; a refusal or no leader ends sagactl with the reason."""
    tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    try:
        return call(_addresses(args), tls, auth.bearer(_token(args)), *rest)
    except grpc.RpcError as exc:
        raise SystemExit(f"sagactl: {exc.code().name}: {exc.details()}") from None
    except TimeoutError as exc:
        raise SystemExit(f"sagactl: {exc}") from None


def _print_members(reply: cluster_pb2.MembershipReply) -> None:
    for m in reply.members:
        print(f"{m.id}  raft {m.raft_addr}  grpc {m.grpc_addr}")


def cmd_add_node(args: argparse.Namespace) -> int:
    request = cluster_pb2.AddNodeRequest(
        node_id=args.id,
        raft_addr=args.raft_addr,
        grpc_addr=args.grpc_addr,
        timeout_ms=int(args.timeout * 1000),
    )
    _print_members(_on_leader_or_exit(args, on_leader, "AddNode", request, args.timeout))
    return 0


def cmd_remove_node(args: argparse.Namespace) -> int:
    _print_members(_on_leader_or_exit(args, remove_member, args.id, args.timeout))
    print(f"node {args.id} no longer votes; stop its process")
    return 0


def _token(args: argparse.Namespace) -> str | None:
    """The caller's token: --token-file, else $SAGA_TOKEN (clusters with --auth-file)."""
    path = getattr(args, "token_file", None)
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("SAGA_TOKEN") or None


def _client(args: argparse.Namespace) -> SagaClient:
    addrs = _addresses(args)
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
    """Follow a saga until it ends: on a terminal, its DAG redrawn live as records
    arrive; otherwise (a pipe, a log) one line per record."""
    if not CONSOLE.is_terminal:
        for event in client.watch(saga_id, from_seq):
            print(f"  [{event.seq:3}] {views.describe(event.record)}", flush=True)
        return
    with Live(views.saga_dag(client.get(saga_id)), console=CONSOLE, auto_refresh=False) as live:
        for _event in client.watch(saga_id, from_seq):
            live.update(views.saga_dag(client.get(saga_id)), refresh=True)


def cmd_submit(args: argparse.Namespace) -> int:
    definition = load_definition(args.file)
    if args.count != 1:
        return _submit_many(args, definition)
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


MAX_BULK_SUBMITS = 1_000_000


def _submit_many(args: argparse.Namespace, definition: log_pb2.SagaDefinition) -> int:
    """`--count N`: N sagas, ids PREFIX-1..PREFIX-N, with a progress bar. The ids
    are fixed, so the same command run again after a failure resubmits nothing
    that was already accepted (Submit is idempotent by id)."""
    if not 1 <= args.count <= MAX_BULK_SUBMITS:
        print(f"sagactl: --count must be 1..{MAX_BULK_SUBMITS}", file=sys.stderr)
        return 2
    prefix = args.id or f"bulk-{uuid.uuid4().hex[:8]}"
    payload = _payload(args.payload)
    columns = (*Progress.get_default_columns(), MofNCompleteColumn())
    with _client(args) as client, Progress(*columns, console=CONSOLE) as progress:
        task = progress.add_task(f"submitting {prefix}-*", total=args.count)
        for i in range(1, args.count + 1):
            try:
                client.submit(definition, payload, f"{prefix}-{i}")
            except grpc.RpcError as exc:
                progress.stop()
                print(f"sagactl: {prefix}-{i}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            progress.advance(task)
    print(f"submitted {args.count} sagas {prefix}-1 .. {prefix}-{args.count}")
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
                        print(f"  [{i:3}] {views.describe(record)}")
            elif args.command == "list":
                state = sagas_pb2.SagaState.Value(args.state) if args.state else 0
                CONSOLE.print(views.saga_list_table(client.list(state=state)))
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sagactl", description="Control a saga cluster.")
    top = p.add_subparsers(dest="group", required=True)
    cluster = top.add_parser("cluster", help="run and inspect a cluster")
    sub = cluster.add_subparsers(dest="command", required=True)

    status = sub.add_parser("status", help="show every node's view as a table")
    _node_flags(status, "a token")
    status.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    status.set_defaults(func=cmd_status)

    forget = sub.add_parser("forget-node", help="unregister a node whose data directory was wiped")
    forget.add_argument("--id", required=True)
    _node_flags(forget, "an admin token")
    forget.set_defaults(func=cmd_forget)

    add_node = sub.add_parser(
        "add-node",
        help="add a node started with `sagalog-node --join` (it catches up, then votes)",
    )
    add_node.add_argument("--id", required=True)
    add_node.add_argument("--raft-addr", required=True, metavar="HOST:PORT")
    add_node.add_argument("--grpc-addr", required=True, metavar="HOST:PORT")
    add_node.add_argument("--timeout", type=float, default=60.0, help="seconds to catch up")
    remove_node = sub.add_parser(
        "remove-node", help="remove a member (the leader hands leadership over first)"
    )
    remove_node.add_argument("--id", required=True)
    remove_node.add_argument("--timeout", type=float, default=10.0)
    for c, func in ((add_node, cmd_add_node), (remove_node, cmd_remove_node)):
        _node_flags(c, "an admin token")
        c.set_defaults(func=func)

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

    saga = top.add_parser("saga", help="submit and follow sagas")
    ssub = saga.add_subparsers(dest="command", required=True)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        c = ssub.add_parser(name, help=text)
        _node_flags(c, "the caller's token")
        c.set_defaults(func=cmd_saga)
        return c

    submit = add("submit", "submit a saga from a YAML or JSON definition")
    submit.add_argument("file")
    submit.add_argument("--payload", help="the payload, or @FILE")
    submit.add_argument("--id", help="the saga id (default: generated)")
    submit.add_argument("--watch", action="store_true", help="follow it live until it ends")
    submit.add_argument(
        "--count",
        type=int,
        default=1,
        help="submit this many, ids ID-1..ID-N (--id is then the prefix), with a progress bar",
    )
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
    for plugin in _plugins():
        plugin(top, sub)
    return p


def _node_flags(command: argparse.ArgumentParser, token: str) -> None:
    """How a command reaches the nodes: a local cluster's directory or addresses,
    the token, TLS."""
    command.add_argument("--dir", default=DEFAULT_DIR, help="a local cluster's directory")
    command.add_argument("--addr", help="HOST:PORT[,HOST:PORT...] of any nodes")
    command.add_argument("--token-file", help=f"{token} (default: $SAGA_TOKEN)")
    command.add_argument("--tls-ca", help="talk TLS, trusting this PEM CA")
    command.add_argument("--tls-cert", help="client certificate (nodes with mutual TLS)")
    command.add_argument("--tls-key", help="the client certificate's key")


def _plugins() -> list[Callable[..., None]]:
    """Commands other packages add (`sagactl.commands` entry points: the test kit's
    local clusters, travel participants and chaos), each called with the top-level
    subparsers and the `cluster` group's. A plugin that fails to load is skipped with
    a warning: the client commands still work."""
    found = []
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            found.append(entry.load())
        except Exception as exc:  # a broken or missing optional package
            print(f"sagactl: commands {entry.name!r} unavailable: {exc}", file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

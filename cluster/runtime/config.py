"""Node configuration: flags or a TOML file, one frozen dataclass, validated once."""

from __future__ import annotations

import argparse
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields, replace

from cluster.shardmap import Group, ShardMap
from cluster.tls import TlsFiles
from sagalog.raft import RaftTiming

DEFAULT_GRPC_WORKERS = 64
# Members of one Raft group: a cluster starts with 3 or 5 and membership changes
# keep it within these (fewer than 3 survive no failure; more slow every commit).
MIN_MEMBERS = 3
MAX_MEMBERS = 7
LOG_FORMATS = ("text", "json")

_ADDR_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass(frozen=True)
class Peer:
    """Another node of the cluster."""

    id: str
    raft_addr: str  # HOST:PORT of its Raft listener
    grpc_addr: str  # HOST:PORT of its gRPC server

    @staticmethod
    def parse(text: str) -> Peer:
        """ID=RAFT_HOST:PORT,GRPC_HOST:PORT"""
        node_id, sep, addrs = text.partition("=")
        raft, comma, grpc_ = addrs.partition(",")
        if not sep or not comma:
            raise ValueError(f"--peer {text!r}: expected ID=RAFT_HOST:PORT,GRPC_HOST:PORT")
        return Peer(node_id.strip(), raft.strip(), grpc_.strip())


@dataclass(frozen=True)
class NodeConfig:
    id: str
    """This node's id: letters, digits, _ and -, at most 64. Unique in the cluster."""
    raft_addr: str
    """HOST:PORT this node's Raft listens on; peers dial it."""
    grpc_addr: str
    """HOST:PORT of this node's gRPC server (Cluster service)."""
    data_dir: str
    """Directory of this node's journal, snapshot and RocksDB store. Created if absent."""
    peers: tuple[Peer, ...] = ()
    """Every other node of the cluster (2 or 4 of them), or with `join` the current
    members. Only where this node's log and snapshot say nothing yet: after a
    membership change they hold the configuration (sagalog.membership)."""
    join: bool = False
    """Join a running cluster whose members are `peers`: receive its log without
    voting until Cluster.AddNode adds this node."""
    raft_password: str | None = None
    """Shared secret: pysyncobj encrypts and authenticates Raft traffic with it.
    Without it Raft messages are pickles that anyone reaching the port can forge,
    so a node refuses to start without one unless `insecure_raft` is set."""
    insecure_raft: bool = False
    """Run Raft without a password. Accepted only when this node's and every peer's
    Raft address is loopback (only processes on this machine can reach them)."""
    timing: RaftTiming = field(default_factory=RaftTiming)
    """Raft timers (see sagalog.raft.RaftTiming)."""
    propose_timeout_ms: int = 5000
    """Default deadline of one proposal."""
    max_in_flight_proposals: int = 10_000
    """Proposals waiting on this node at once; more get RESOURCE_EXHAUSTED."""
    grpc_workers: int = DEFAULT_GRPC_WORKERS
    """gRPC server threads (each blocking call or Watch stream holds one)."""
    compaction_min_entries: int = 50_000
    """Journal entries before a snapshot is taken and the journal compacted."""
    ended_retention_s: float = 7 * 24 * 3600
    """How long an ended saga keeps its records; then they are replaced by a
    tombstone (Get still answers, Submit stays idempotent). 0 keeps them forever.
    See cluster.runtime.retention."""
    coordinator: bool = True
    """Run the Saga Execution Coordinator while this node leads. Off only to
    measure the log alone (bench/log_append.py): sagas are then logged, not run."""
    auth_file: str | None = None
    """TOML file of token hashes and roles (cluster.auth). Without one every call is
    allowed, which a node accepts only on a loopback gRPC address."""
    insecure_grpc: bool = False
    """Serve gRPC in plaintext, or without --auth-file, on a non-loopback address."""
    tls_cert: str | None = None
    """PEM certificate this node serves gRPC with (and presents to its peers)."""
    tls_key: str | None = None
    """PEM key of `tls_cert`."""
    tls_ca: str | None = None
    """PEM CA this node trusts for its peers and, with `tls_require_client_cert`,
    for its callers' client certificates. None: the system's roots."""
    tls_require_client_cert: bool = False
    """Callers must present a client certificate signed by `tls_ca` (mutual TLS)."""
    participant_tls_ca: str | None = None
    """Dial participants with TLS, trusting this PEM CA (plaintext without it)."""
    participant_allow: tuple[str, ...] = ()
    """Participant endpoints a saga may name: HOST:PORT or HOST:* entries. Empty:
    any HOST:PORT (never a URI scheme: see sagalog.definition.check_endpoint)."""
    test_propose: bool = False
    """Testing aid: serve Cluster.Propose, which appends raw saga records (never
    cluster records). Off in production: clients use the Sagas service."""
    fault_file: str | None = None
    """Testing aid: a JSON file of Raft link faults (see sagalog.raft.LinkFaults),
    re-read when it changes. Never set it in production."""
    metrics_addr: str | None = None
    """HOST:PORT to serve Prometheus metrics on (/metrics, plain HTTP: counts and
    timings, no saga data). None: no metrics listener."""
    http_addr: str | None = None
    """HOST:PORT of the web page (the cluster, the sagas, each saga's DAG) and its
    JSON API; HTTPS with the node's certificate when it has one. It may equal
    `metrics_addr`. None: no web page."""
    otlp_endpoint: str | None = None
    """HOST:PORT of an OpenTelemetry collector (OTLP over gRPC, plaintext: run a
    collector agent beside the node). A trace per saga, a span per participant
    call. Needs the `otel` extra. None: no traces."""
    log_format: str = "text"
    """text | json (one JSON object a line)."""
    join_check_ms: int = 1000
    """How long a node with a new data directory asks its peers whether the cluster
    already knows it (a wiped node must not rejoin as if it had never voted)."""
    shard_map: str | None = None
    """JSON file of the cluster's Raft groups (cluster.shardmap), the same on every
    node of every group. This node's group is the one that lists its `grpc_addr`;
    its peers must be that group's other nodes. None: one group, this node's."""

    def validate(self) -> None:
        check_node(self.id, self.raft_addr, self.grpc_addr)
        for name, optional in [
            ("--metrics-addr", self.metrics_addr),
            ("--http-addr", self.http_addr),
            ("--otlp-endpoint", self.otlp_endpoint),
        ]:
            if optional is not None:
                _check_addr(name, optional)
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format {self.log_format!r}: choose one of {LOG_FORMATS}")
        if not self.data_dir:
            raise ValueError("--data-dir is required")
        ids = [self.id] + [p.id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"node ids must be unique, got {ids}")
        raft_addrs = [self.raft_addr] + [p.raft_addr for p in self.peers]
        if len(set(raft_addrs)) != len(raft_addrs):
            raise ValueError(f"raft addresses must be unique, got {raft_addrs}")
        for peer in self.peers:
            if not _ID_RE.match(peer.id):
                raise ValueError(f"--peer id {peer.id!r}: use 1-64 letters, digits, _ or -")
            _check_addr(f"--peer {peer.id} raft", peer.raft_addr)
            _check_addr(f"--peer {peer.id} grpc", peer.grpc_addr)
        if self.join and not MIN_MEMBERS <= len(self.peers) < MAX_MEMBERS:
            raise ValueError(
                f"--join: give the {MIN_MEMBERS} to {MAX_MEMBERS - 1} current members as "
                f"--peer, got {len(self.peers)}"
            )
        if not self.join and len(self.peers) not in (2, 4):
            raise ValueError(
                f"a cluster has 3 or 5 nodes: give 2 or 4 --peer, got {len(self.peers)}"
            )
        if self.raft_password is not None and len(self.raft_password) < 8:
            raise ValueError("the Raft password must be at least 8 characters")
        if self.raft_password is None and not self.insecure_raft:
            raise ValueError(
                "a Raft password is required (--raft-password-file FILE): Raft traffic is "
                "pickled, and anyone who can reach the port could run code in this node; "
                "--insecure-raft runs without one, on loopback addresses only"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("give --tls-cert and --tls-key together")
        if self.auth_file and self.raft_password is None:
            raise ValueError(
                "--auth-file needs --raft-password-file: nodes authenticate to each other "
                "with a credential derived from it"
            )
        if self.tls_require_client_cert and not (self.tls_cert and self.tls_ca):
            raise ValueError("--tls-require-client-cert needs --tls-cert, --tls-key and --tls-ca")
        # The web page is a gateway to the same API: the same rule for its address.
        exposed_api = [a for a in (self.grpc_addr, self.http_addr) if a and not is_loopback(a)]
        if exposed_api and not self.insecure_grpc:
            missing = [
                flag
                for flag, given in (
                    ("--tls-cert/--tls-key", self.tls_cert),
                    ("--auth-file", self.auth_file),
                )
                if not given
            ]
            if missing:
                raise ValueError(
                    f"{', '.join(exposed_api)} is not loopback: give {' and '.join(missing)} "
                    "(or --insecure-grpc to serve gRPC and the web page without)"
                )
        if self.raft_password is None:
            exposed = [a for a in raft_addrs if not is_loopback(a)]
            if exposed:
                raise ValueError(
                    f"--insecure-raft is accepted only on loopback Raft addresses, not {exposed}: "
                    "give --raft-password-file"
                )
        for name in ("propose_timeout_ms", "max_in_flight_proposals", "grpc_workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.ended_retention_s < 0:
            raise ValueError("ended_retention_s must be >= 0 (0 keeps ended sagas forever)")
        if self.compaction_min_entries < 100:
            raise ValueError("compaction_min_entries must be >= 100")
        self.timing.validate()


def shard_of(config: NodeConfig) -> tuple[ShardMap, Group]:
    """The cluster's shard map and this node's group in it (ValueError when the
    map does not hold this node with exactly its peers)."""
    members = [config.grpc_addr, *(p.grpc_addr for p in config.peers)]
    if config.shard_map is None:
        shard_map = ShardMap.single(members)
        return shard_map, shard_map.groups[0]
    shard_map = ShardMap.load(config.shard_map)
    # A joining node is not in the map (written when the cluster was created): its
    # group is its peers'.
    candidates = members if config.join else [config.grpc_addr]
    own = next((g for a in candidates if (g := shard_map.group_with(a)) is not None), None)
    if own is None:
        raise ValueError(f"--shard-map {config.shard_map}: no group lists {candidates[0]}")
    if not config.join and sorted(own.nodes) != sorted(members):
        raise ValueError(
            f"--shard-map {config.shard_map}: group {own.index} is {sorted(own.nodes)}, but "
            f"this node and its peers are {sorted(members)} (gRPC addresses)"
        )
    return shard_map, own


def check_node(node_id: str, raft_addr: str, grpc_addr: str) -> None:
    """ValueError unless these name a node: its id and its two HOST:PORTs."""
    if not _ID_RE.match(node_id):
        raise ValueError(f"--id {node_id!r}: use 1-64 letters, digits, _ or -")
    for name, addr in [("--raft-addr", raft_addr), ("--grpc-addr", grpc_addr)]:
        _check_addr(name, addr)


def _check_addr(name: str, addr: str) -> None:
    if not _ADDR_RE.match(addr or ""):
        raise ValueError(f"{name} {addr!r}: expected HOST:PORT")
    port = int(addr.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise ValueError(f"{name} {addr!r}: port out of range")


def node_tls(config: NodeConfig) -> TlsFiles | None:
    """The TLS files a node serves with and presents to its peers (None: plaintext)."""
    if not config.tls_cert:
        return None
    return TlsFiles(ca=config.tls_ca, cert=config.tls_cert, key=config.tls_key)


def participant_tls(config: NodeConfig) -> TlsFiles | None:
    """How the coordinator dials participants: TLS trusting `participant_tls_ca`,
    presenting the node's own certificate where it has one."""
    if not config.participant_tls_ca:
        return None
    return TlsFiles(ca=config.participant_tls_ca, cert=config.tls_cert, key=config.tls_key)


def is_loopback(addr: str) -> bool:
    """Whether HOST:PORT names this machine's loopback interface (127.0.0.0/8,
    ::1 or localhost), the only addresses no other machine can reach."""
    host = addr.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sagalog-node",
        description="One node of a Raft-replicated Saga Log cluster.",
    )
    p.add_argument("--config", help="TOML file; flags given on the command line override it")
    p.add_argument("--id")
    p.add_argument("--raft-addr", metavar="HOST:PORT")
    p.add_argument("--grpc-addr", metavar="HOST:PORT")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument(
        "--peer",
        action="append",
        default=None,
        metavar="ID=RAFT_HOST:PORT,GRPC_HOST:PORT",
        help="another node; once per other node",
    )
    p.add_argument(
        "--raft-password-file",
        metavar="FILE",
        help="file holding the Raft secret (required unless --insecure-raft)",
    )
    p.add_argument(
        "--insecure-raft",
        action="store_true",
        help="run Raft unauthenticated; accepted only when every Raft address is loopback",
    )
    p.add_argument(
        "--join",
        action="store_true",
        help="join a running cluster (--peer: its current members); vote once "
        "`sagactl cluster add-node` has added this node",
    )
    p.add_argument("--fault-file", metavar="FILE", help="testing aid: Raft link faults (JSON)")
    p.add_argument(
        "--auth-file",
        metavar="FILE",
        help="token hashes and roles (sagactl auth add-token); callers then need a token",
    )
    p.add_argument(
        "--insecure-grpc",
        action="store_true",
        help="serve gRPC without TLS or without --auth-file on a non-loopback address",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="serve gRPC with TLS: certificate")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's key")
    p.add_argument("--tls-ca", metavar="PEM", help="CA trusted for peers and client certificates")
    p.add_argument(
        "--tls-require-client-cert",
        action="store_true",
        help="callers must present a client certificate signed by --tls-ca",
    )
    p.add_argument(
        "--participant-tls-ca", metavar="PEM", help="dial participants with TLS, trusting this CA"
    )
    p.add_argument(
        "--participant-allow",
        action="append",
        default=None,
        metavar="HOST:PORT|HOST:*",
        help="a participant endpoint sagas may name (repeat; default: any HOST:PORT)",
    )
    p.add_argument(
        "--test-propose",
        action="store_true",
        help="testing aid: serve Cluster.Propose (raw saga records); never in production",
    )
    p.add_argument(
        "--ended-retention-s",
        type=float,
        metavar="SECONDS",
        help="keep an ended saga's records this long, then purge them to a tombstone "
        "(default 7 days; 0: forever)",
    )
    p.add_argument(
        "--no-coordinator",
        action="store_true",
        help="log only: do not run sagas (for benchmarking the log)",
    )
    p.add_argument(
        "--metrics-addr", metavar="HOST:PORT", help="serve Prometheus metrics at /metrics"
    )
    p.add_argument(
        "--http-addr",
        metavar="HOST:PORT",
        help="serve the web page (may equal --metrics-addr)",
    )
    p.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json lines")
    p.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        help="export traces to this OpenTelemetry collector (OTLP/gRPC; the otel extra)",
    )
    p.add_argument(
        "--shard-map",
        metavar="FILE",
        help="JSON map of the cluster's Raft groups (sagactl cluster up --groups N writes one)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def from_args(argv: list[str] | None = None) -> tuple[NodeConfig, str]:
    """(config, log level) from flags and the optional TOML file."""
    args = parser().parse_args(argv)
    values: dict = {}
    timing: dict = {}
    if args.config:
        with open(args.config, "rb") as f:
            doc = tomllib.load(f)
        timing = doc.pop("timing", {})
        peers = doc.pop("peers", [])
        values.update(doc)
        values["peers"] = tuple(Peer(**p) for p in peers)
        if "raft_password_file" in values:
            values["raft_password"] = read_secret(values.pop("raft_password_file"))
    for flag in ("id", "raft_addr", "grpc_addr", "data_dir"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.peer is not None:
        values["peers"] = tuple(Peer.parse(p) for p in args.peer)
    if args.fault_file:
        values["fault_file"] = args.fault_file
    if args.join:
        values["join"] = True
    if args.test_propose:
        values["test_propose"] = True
    if args.auth_file:
        values["auth_file"] = args.auth_file
    if args.insecure_grpc:
        values["insecure_grpc"] = True
    for flag in ("tls_cert", "tls_key", "tls_ca", "participant_tls_ca"):
        if getattr(args, flag):
            values[flag] = getattr(args, flag)
    if args.tls_require_client_cert:
        values["tls_require_client_cert"] = True
    if args.participant_allow is not None:
        values["participant_allow"] = tuple(args.participant_allow)
    if "participant_allow" in values:  # TOML gives a list
        values["participant_allow"] = tuple(values["participant_allow"])
    if args.ended_retention_s is not None:
        values["ended_retention_s"] = args.ended_retention_s
    for flag in ("metrics_addr", "http_addr", "log_format", "otlp_endpoint", "shard_map"):
        if getattr(args, flag):
            values[flag] = getattr(args, flag)
    if args.no_coordinator:
        values["coordinator"] = False
    if args.raft_password_file:
        values["raft_password"] = read_secret(args.raft_password_file)
    if args.insecure_raft:
        values["insecure_raft"] = True
    missing = [f for f in ("id", "raft_addr", "grpc_addr", "data_dir") if f not in values]
    if missing:
        raise ValueError("missing: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    known = {f.name for f in fields(NodeConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    config = NodeConfig(**values)
    if timing:
        config = replace(config, timing=RaftTiming(**timing))
    config.validate()
    shard_of(config)  # a map that does not hold this node is a usage error
    return config, args.log_level


def read_secret(path: str) -> str:
    """The Raft password held in `path` (surrounding whitespace stripped)."""
    with open(path, encoding="utf-8") as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError(f"the Raft password file {path} is empty")
    return secret

"""What sagactl draws in a terminal (rich): the cluster table, the saga list, and a
saga's DAG with each vertex coloured by its state. Pure functions from the
protobuf replies to rich renderables; sagactl does the calls and the printing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text
from saga.v1 import cluster_pb2, log_pb2, sagas_pb2

from sagalog.records import definition_in, fields_of

ROLE_NAMES = {cluster_pb2.FOLLOWER: "follower", cluster_pb2.CANDIDATE: "candidate",
              cluster_pb2.LEADER: "leader"}  # fmt: skip
STATE_STYLES = {
    "RUNNING": "bold blue",
    "COMPLETED": "bold green",
    "ABORTING": "bold yellow",
    "ABORTED": "bold magenta",
    "STUCK": "bold red",
    "PENDING": "dim",
    "STARTED": "blue",
    "DONE": "green",
    "FAILED": "red",
    "COMPENSATING": "yellow",
    "COMPENSATED": "magenta",
    "VERTEX_STUCK": "bold red",
}
ROLE_STYLES = {"leader": "bold green", "candidate": "yellow", "unreachable": "red"}
RECENT_RECORDS = 8  # the last records shown under a live DAG


def styled(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def _row(table: Table, *cells: str | Text) -> None:
    """A row of plain text: saga ids, names and errors are chosen by clients and
    participants, and rich would read `[...]` in a str cell as markup."""
    table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in cells))


def cluster_table(
    replies: Sequence[tuple[str, cluster_pb2.StatusReply | None]], title: str = "cluster"
) -> Table:
    """One row per node (address, its own Status or None when unreachable)."""
    table = Table(title=title, title_justify="left")
    for column in ("ID", "ROLE", "TERM", "EPOCH", "LEADER", "COMMIT", "APPLIED", "RAFT", "GRPC"):
        table.add_column(column, justify="right" if column in ("TERM", "EPOCH") else "left")
    for addr, r in replies:
        if r is None:
            _row(table, "?", Text("unreachable", style="red"), "", "", "", "", "", "", addr)
            continue
        role = ROLE_NAMES.get(r.role, "?") + (" (in office)" if r.in_office else "")
        raft_addr = next((m.raft_addr for m in r.members if m.id == r.id), "")
        _row(
            table,
            r.id,
            Text(role, style=ROLE_STYLES.get(ROLE_NAMES.get(r.role, ""), "")),
            str(r.term),
            str(r.epoch),
            r.leader_id or "-",
            str(r.commit_index),
            str(r.applied_index),
            raft_addr,
            addr,
        )
    return table


def saga_list_table(summaries: Iterable[sagas_pb2.SagaSummary]) -> Table:
    table = Table(title="sagas", title_justify="left")
    table.add_column("SAGA")
    table.add_column("STATE")
    table.add_column("DEFINITION")
    for s in summaries:
        _row(table, s.saga_id, styled(sagas_pb2.SagaState.Name(s.state)), s.name)
    return table


def levels(definition: log_pb2.SagaDefinition) -> list[list[str]]:
    """The vertices in columns by longest path from Start: each vertex stands right
    of every vertex it depends on (the picture in the talk, left to right)."""
    deps = {v.name: [d for d in v.depends_on] for v in definition.vertices}
    depth: dict[str, int] = {}

    def level(name: str, trail: frozenset[str] = frozenset()) -> int:
        if name not in depth:
            inner = [d for d in deps.get(name, []) if d in deps and d not in trail]
            depth[name] = 1 + max((level(d, trail | {name}) for d in inner), default=0)
        return depth[name]

    for name in deps:
        level(name)
    columns: list[list[str]] = [[] for _ in range(max(depth.values(), default=0))]
    for v in definition.vertices:
        columns[depth[v.name] - 1].append(v.name)
    return columns


def saga_dag(info: sagas_pb2.SagaInfo) -> Group:
    """The saga's state, its DAG as columns (Start, each level, End) with every
    vertex coloured by its state, the edges listed, and its latest records."""
    definition = definition_in(info.records)
    states = {v.name: sagas_pb2.VertexState.Name(v.state) for v in info.vertices}
    state = sagas_pb2.SagaState.Name(info.state)
    title = Text.assemble("saga ", (info.saga_id, "bold"), f" ({info.name}) ", styled(state))
    dag = Table(show_header=False, box=None, padding=(0, 2))
    columns = levels(definition)
    for _ in range(len(columns) + 2):
        dag.add_column(vertical="middle")
    end_style = {"COMPLETED": "green", "ABORTED": "magenta"}.get(state, "dim")
    cells: list[Text | Table] = [Text("● Start ─▶", style="green" if info.records else "dim")]
    for column in columns:
        inner = Table(show_header=False, box=None, padding=0)
        inner.add_column()
        for name in column:
            vertex_state = states.get(name, "PENDING")
            inner.add_row(
                Text.assemble(
                    ("[ ", "dim"), (name, "bold"), " ", styled(vertex_state), (" ] ─▶", "dim")
                )
            )
        cells.append(inner)
    cells.append(Text("● End", style=end_style))
    dag.add_row(*cells)
    edges = [f"{', '.join(v.depends_on)} ─▶ {v.name}" for v in definition.vertices if v.depends_on]
    parts: list[Text | Table] = [title, dag]
    if edges:
        parts.append(Text("waits for: " + "; ".join(edges), style="dim"))
    if info.abort_reason:
        parts.append(Text(f"abort reason: {info.abort_reason}", style="magenta"))
    recent = list(enumerate(info.records, start=1))[-RECENT_RECORDS:]
    if recent:
        log = Table(title="latest records", title_justify="left", box=None)
        log.add_column("#", justify="right")
        log.add_column("record")
        for seq, record in recent:
            _row(log, str(seq), describe(record))
        parts.append(log)
    return Group(*parts)


def describe(record: log_pb2.Record) -> str:
    """A record in one line: its body and fields (the definition left out, the
    payload as its length, an output as text) and its epoch."""
    body, fields = fields_of(record, output_as_text=True)
    detail = ", ".join(f"{k}={v}" for k, v in fields.items())
    return f"{body or '?'}({detail}) epoch={record.epoch}"

"""What sagactl draws: the DAG's columns, vertex states, the live watch on a terminal."""

from __future__ import annotations

import io

from rich.console import Console
from saga.v1 import log_pb2, sagas_pb2

from cluster.client import sagactl, views


def _definition(edges: dict[str, list[str]]) -> log_pb2.SagaDefinition:
    return log_pb2.SagaDefinition(
        name="trip",
        vertices=[log_pb2.Vertex(name=n, depends_on=deps) for n, deps in edges.items()],
    )


def _info(state: int, vertices: dict[str, int], edges: dict[str, list[str]]) -> sagas_pb2.SagaInfo:
    start = log_pb2.Record(saga_id="s1", epoch=1)
    start.start_saga.definition.CopyFrom(_definition(edges))
    return sagas_pb2.SagaInfo(
        saga_id="s1",
        name="trip",
        state=state,  # type: ignore[arg-type]
        vertices=[sagas_pb2.VertexInfo(name=n, state=s) for n, s in vertices.items()],  # type: ignore[misc]
        records=[start],
    )


def _text(renderable, terminal: bool = False) -> str:
    console = Console(file=io.StringIO(), width=140, force_terminal=terminal, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


TRAVEL = {"Hotel": [], "Car": [], "Flight": [], "Payment": ["Hotel", "Car", "Flight"]}


def test_vertices_stand_right_of_what_they_wait_for() -> None:
    assert views.levels(_definition(TRAVEL)) == [["Hotel", "Car", "Flight"], ["Payment"]]
    chain = {"c": ["b"], "b": ["a"], "a": [], "d": ["a", "c"]}
    assert views.levels(_definition(chain)) == [["a"], ["b"], ["c"], ["d"]]


def test_the_dag_shows_each_vertex_with_its_state_and_the_sagas_state() -> None:
    info = _info(
        sagas_pb2.ABORTED,
        {"Hotel": sagas_pb2.COMPENSATED, "Car": sagas_pb2.FAILED, "Flight": sagas_pb2.COMPENSATED,
         "Payment": sagas_pb2.PENDING},
        TRAVEL,
    )  # fmt: skip
    text = _text(views.saga_dag(info))
    assert "saga s1 (trip) ABORTED" in text
    column = {w: next(ln.index(w) for ln in text.splitlines() if w in ln) for w in
              ("Start", "Hotel", "Car", "Payment", "End")}  # fmt: skip
    assert column["Start"] < column["Hotel"] == column["Car"] < column["Payment"] < column["End"]
    for piece in ("Hotel COMPENSATED", "Car FAILED", "Payment PENDING"):
        assert piece in text, text
    assert "Hotel, Car, Flight ─▶ Payment" in text
    assert "start_saga" in text  # the latest records


def test_watch_redraws_the_dag_on_a_terminal_and_prints_lines_elsewhere(monkeypatch) -> None:
    running = _info(sagas_pb2.RUNNING, {"A": sagas_pb2.STARTED}, {"A": []})
    done = _info(sagas_pb2.COMPLETED, {"A": sagas_pb2.DONE}, {"A": []})
    end = log_pb2.Record(saga_id="s1", epoch=1)
    end.end_saga.outcome = log_pb2.OUTCOME_COMPLETED

    class Client:
        def __init__(self) -> None:
            self.gets = [running, done]

        def get(self, saga_id: str) -> sagas_pb2.SagaInfo:
            return self.gets.pop(0) if len(self.gets) > 1 else self.gets[0]

        def watch(self, saga_id: str, from_seq: int = 0):
            yield sagas_pb2.WatchEvent(seq=2, record=end)

    out = io.StringIO()
    monkeypatch.setattr(sagactl, "CONSOLE", Console(file=out, force_terminal=True, width=100))
    sagactl._watch(Client(), "s1")  # type: ignore[arg-type]
    drawn = out.getvalue()
    assert "RUNNING" in drawn and "COMPLETED" in drawn  # drawn, then redrawn

    piped = io.StringIO()
    monkeypatch.setattr(sagactl, "CONSOLE", Console(file=piped, force_terminal=False))
    lines: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    sagactl._watch(Client(), "s1")  # type: ignore[arg-type]
    assert lines == ["  [  2] end_saga(outcome=OUTCOME_COMPLETED) epoch=1"]


def test_text_chosen_by_clients_is_never_read_as_markup() -> None:
    hostile = "[/]oops [link=http://x]y[/link] [bold]z"
    summaries = [sagas_pb2.SagaSummary(saga_id=hostile, name=hostile, state=sagas_pb2.RUNNING)]
    listed = _text(views.saga_list_table(summaries), terminal=True)
    assert listed.count("[/]oops") == 2 and listed.count("[link=http://x]") == 2
    info = _info(sagas_pb2.ABORTED, {"A": sagas_pb2.COMPENSATED}, {"A": []})
    info.abort_reason = hostile
    info.records[0].start_saga.definition.name = hostile
    text = _text(views.saga_dag(info), terminal=True)
    assert "[/]oops" in text and "[bold]z" in text

"""JSON log lines: one object a line, with the saga's fields where the call names them."""

from __future__ import annotations

import json
import logging

from cluster.logformat import JsonFormatter, saga_fields


def _line(record: logging.LogRecord) -> dict:
    text = JsonFormatter("n2").format(record)
    assert "\n" not in text
    return json.loads(text)


def _record(msg: str, *args, extra: dict | None = None, exc_info=None) -> logging.LogRecord:
    record = logging.LogRecord("sagacluster.x", logging.WARNING, __file__, 1, msg, args, exc_info)
    for k, v in (extra or {}).items():
        setattr(record, k, v)
    return record


def test_a_line_carries_time_level_node_logger_and_message() -> None:
    doc = _line(_record("took %d ms\nover two lines", 7))
    assert doc["level"] == "WARNING" and doc["node"] == "n2" and doc["logger"] == "sagacluster.x"
    assert doc["message"] == "took 7 ms\nover two lines"
    assert doc["time"].endswith("Z") and "T" in doc["time"]
    assert not {"saga_id", "vertex", "epoch", "attempt"} & set(doc)


def test_saga_fields_are_added_where_given() -> None:
    doc = _line(_record("unreachable", extra=saga_fields("s-1", "Car", 3, 2)))
    assert (doc["saga_id"], doc["vertex"], doc["epoch"], doc["attempt"]) == ("s-1", "Car", 3, 2)
    assert "vertex" not in _line(_record("aborted", extra=saga_fields("s-1", epoch=3)))


def test_an_exception_goes_in_its_own_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        doc = _line(_record("failed", exc_info=sys.exc_info()))
    assert "ValueError: boom" in doc["exception"]


def test_an_exception_escaping_a_thread_is_a_json_line(capsys) -> None:
    import threading

    from cluster.logformat import configure

    saved = threading.excepthook, logging.getLogger().handlers[:], logging.getLogger().level
    try:
        configure("n3", "INFO", "json")

        def boom() -> None:
            raise RuntimeError("escaped")

        worker = threading.Thread(target=boom, name="worker-1")
        worker.start()
        worker.join()
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        docs = [json.loads(ln) for ln in lines]  # nothing but JSON lines
        assert docs[-1]["level"] == "CRITICAL" and "worker-1" in docs[-1]["message"]
        assert "RuntimeError: escaped" in docs[-1]["exception"]
    finally:
        threading.excepthook = saved[0]
        logging.getLogger().handlers[:] = saved[1]
        logging.getLogger().setLevel(saved[2])

"""How nodes (and the test kit's participants) write their logs: text for people,
or `json`, one object a line for log shippers.

A JSON line holds time (UTC, ISO 8601), level, node, logger and message, and,
where the call site names them (`extra=`), the saga id, vertex, epoch and
attempt; an exception's traceback goes in `exception`.
"""

from __future__ import annotations

import json
import logging
import threading
import time

SAGA_FIELDS = ("saga_id", "vertex", "epoch", "attempt")


def saga_fields(
    saga_id: str, vertex: str | None = None, epoch: int | None = None, attempt: int | None = None
) -> dict[str, object]:
    """`extra=` for a log call about one saga (None fields are left out)."""
    values = {"saga_id": saga_id, "vertex": vertex, "epoch": epoch, "attempt": attempt}
    return {k: v for k, v in values.items() if v is not None}


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self._node = node

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "node": self._node,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in SAGA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(node: str, level: str, log_format: str = "text") -> None:
    """The root logger's one handler (stderr) in the chosen format."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(node))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {node} %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # An exception that escapes a thread would be printed raw to stderr, as lines
    # no log shipper can parse: log it instead, in the chosen format.
    threading.excepthook = _log_thread_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("sagacluster").critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )

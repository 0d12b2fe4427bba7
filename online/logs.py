"""Logging setup for ``twotower serve``: plain text for a terminal, or one JSON object per
line (``--log-format json``) for a log pipeline (Loki, Elasticsearch, Cloud Logging) that
indexes fields instead of parsing text.

Every JSON line has ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
``message`` and ``pid``; request-scoped lines (degraded responses, internal errors) add the
fields their call passed as ``extra=`` — ``request_id``, ``version``, ``variant``, ``rung``,
``reasons`` (``online.metrics.request_fields``); an exception adds ``exc``. The standard
library's ``logging`` with a small Formatter: no dependency for twenty lines of code.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
# A LogRecord's own attributes: everything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(*, level: int = logging.INFO, fmt: str = "text", text_format: str = TEXT_FORMAT) -> None:
    """The root logger writes to stderr in ``fmt`` (text | json). Replaces earlier handlers,
    so a spawned worker and the supervisor format the same way."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)

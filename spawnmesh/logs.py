"""Logging set-up for a node: readable lines for people, one JSON object per line for machines.

Only the stdlib :mod:`logging` is used, so library code just does
``logging.getLogger(__name__).info("msg", extra={"actor": ...})`` and the extras show up as
``key=value`` (human) or as JSON fields (json).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import IO, Any

from spawnmesh.errors import ConfigError

__all__ = ["FORMATS", "LEVELS", "HumanFormatter", "JsonFormatter", "setup_logging"]

FORMATS: tuple[str, ...] = ("human", "json")
"""The accepted values of ``fmt`` (and of the ``log.format`` setting)."""

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
"""The accepted values of ``level`` (and of the ``log.level`` setting)."""

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and k[:1] != "_"}


def _timestamp(record: logging.LogRecord) -> str:
    when = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _human_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if text == "" or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class HumanFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger>: <message> key=value ...`` plus any traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as one readable line (a traceback, if any, follows indented)."""
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_human_value(v)}" for k, v in extras.items())
        tail = self._tail(record)
        if tail:
            line += "\n" + tail
        return line

    def _tail(self, record: logging.LogRecord) -> str:
        parts: list[str] = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)


class JsonFormatter(HumanFormatter):
    """One JSON object per line: ts, level, logger, msg, the extras, and ``exc``/``stack``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as one line of JSON (non-JSON extras become their ``str``)."""
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            obj[key if key not in obj else f"extra_{key}"] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class _SpawnmeshHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(fmt: str, level: str, stream: IO[str] | None = None) -> None:
    """Send all logging to ``stream`` (default stderr) as ``fmt`` ("human"/"json") at ``level``.

    Idempotent: a previous handler installed by this function is replaced, never duplicated.
    """
    if fmt not in FORMATS:
        raise ConfigError("log.format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if level.lower() not in LEVELS:
        raise ConfigError("log.level", f"must be one of {', '.join(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SpawnmeshHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _SpawnmeshHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root.addHandler(handler)
    root.setLevel(LEVELS[level.lower()])
    logging.captureWarnings(True)

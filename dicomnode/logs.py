"""Structured logging without patient-identifying values.

Modules log events as ``log.info("instance.stored", extra=fields(sop=uid, bytes=n))``;
the formatter renders the fields as ``key=value`` (text) or as one JSON object per
line (json). Only UIDs, counts, states and AE titles are passed as fields: never a
patient name, ID or birth date. ``PhiFilter`` is a last line of defence that drops
any field whose name looks like a patient attribute.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

_FIELDS = "dn_fields"
_PHI_KEYS = ("patientname", "patientid", "patientbirthdate", "patient_name", "patient_id",
             "birth", "otherpatient")


def fields(**values: Any) -> dict[str, Any]:
    """Wrap structured fields for the ``extra`` argument of a logging call.

    Parameters
    ----------
    **values
        Field names and values (UIDs, counts, states; never patient identifiers).

    Returns
    -------
    dict
        ``{"dn_fields": values}``, to pass as ``extra=``.
    """
    return {_FIELDS: values}


class PhiFilter(logging.Filter):
    """Drop structured fields whose names look like patient attributes."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = getattr(record, _FIELDS, None)
        if values:
            setattr(record, _FIELDS, {
                k: v for k, v in values.items()
                if not any(p in k.lower() for p in _PHI_KEYS)
            })
        return True


class LogLimit:
    """At most one log line per key (an address, a certificate) per interval.

    A scanner retrying a refused connection, or a client context made for every
    delivery, would otherwise write the same line many times a second; :meth:`admit`
    says when to write it and how many were left out since the last one.

    Parameters
    ----------
    interval_s : float
        Seconds between two lines of one key.
    max_keys : int
        Keys remembered; past it the quiet ones are forgotten (and all of them in a
        flood from everywhere), so that memory stays bounded.
    """

    def __init__(self, interval_s: float, max_keys: int = 4096) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._last: dict[Hashable, tuple[float, int]] = {}   # key -> (logged at, left out)

    def admit(self, key: Hashable) -> int | None:
        """None to leave this line out; else write it, with this many left out before it."""
        now = time.monotonic()
        with self._lock:
            logged, left_out = self._last.get(key, (now - self.interval_s, 0))
            if now - logged < self.interval_s:
                self._last[key] = (logged, left_out + 1)
                return None
            if len(self._last) >= self.max_keys:   # forget the quiet ones
                self._last = {k: v for k, v in self._last.items()
                              if now - v[0] < self.interval_s}
                if len(self._last) >= self.max_keys:
                    self._last.clear()
            self._last[key] = (now, 0)
            return left_out


_quiet = threading.local()


@contextmanager
def quiet_info() -> Iterator[None]:
    """Leave this thread's INFO and DEBUG records out of the node's log for a while.

    For start-up work on synthetic data (warming the encoders on a small phantom): its
    dozen "series loaded", "SEG built", "result written" lines with made-up UIDs would
    read like real studies. Warnings and errors still show; other threads (the listener
    receiving a study meanwhile) are not affected.
    """
    previous = getattr(_quiet, "on", False)
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = previous


class QuietFilter(logging.Filter):
    """Drop INFO and lower records of a thread inside :func:`quiet_info`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not getattr(_quiet, "on", False)


class TextFormatter(logging.Formatter):
    """``2026-11-25T10:00:00Z INFO dicomnode.net.scp instance.stored sop=1.2.3 bytes=5``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{ts}Z", record.levelname, record.name, record.getMessage()]
        for key, value in (getattr(record, _FIELDS, None) or {}).items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if ' ' in text or not text else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, _FIELDS, None) or {})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record.

    A handler bound to the stream of the moment breaks once that stream is replaced
    and closed (a test runner, an embedding application).
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


#: ``(level, fmt)`` of the last :func:`configure_logging` call (None: never called).
_configured: tuple[str, str] | None = None


def logging_config() -> tuple[str, str] | None:
    """The ``(level, fmt)`` this process's logs were configured with, for a helper process
    to log the same way (None when :func:`configure_logging` was never called)."""
    return _configured


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the package's logs to stderr in the chosen format.

    Parameters
    ----------
    level : str
        Logging level name.
    fmt : {"text", "json"}
        Output format.
    """
    global _configured
    _configured = (level, fmt)
    handler = StderrHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(PhiFilter())
    handler.addFilter(QuietFilter())
    root = logging.getLogger("dicomnode")
    for old in list(root.handlers):
        if not isinstance(old, logging.NullHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom is chatty at INFO and its identifiers may include patient values.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

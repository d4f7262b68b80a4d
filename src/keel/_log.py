"""Structured log lines: ``event=name key=value ...`` on the standard logging module.

Services get one parseable line per event; `configure()` is what the CLI and the service
runner call. Library code only calls `event()`, so an application's own logging setup wins.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, level: int, name: str, /, **fields: Any) -> None:
    """Log one structured line if the level is enabled (cheap when it is not)."""
    if logger.isEnabledFor(level):
        parts = [f"event={name}"]
        parts.extend(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)
        logger.log(level, " ".join(parts))


def configure(level: int = logging.INFO) -> None:
    """Send Keel's structured lines to stderr with a timestamp and the logger name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    root = logging.getLogger("keel")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False

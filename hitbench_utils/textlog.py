"""The run's text log (``run.log``): what ``tail -f`` shows, with a console echo for the notebook."""
from __future__ import annotations

import logging
from pathlib import Path

LOGGER = "hitbench"


def attach_file_log(path: Path, secrets: list[str] | None = None) -> logging.Handler:
    """run.log, with ``secrets`` masked in every line (on the logger: the notebook's echo too)."""
    from .redact import RedactingFilter

    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    lg = logging.getLogger(LOGGER)
    for f in [f for f in lg.filters if isinstance(f, RedactingFilter)]:
        lg.removeFilter(f)
    if secrets:
        lg.addFilter(RedactingFilter(secrets))
    lg.setLevel(logging.INFO)
    lg.propagate = False          # our own handlers print it; the root logger would print it twice
    lg.addHandler(h)
    if not any(isinstance(x, logging.StreamHandler) and not isinstance(x, logging.FileHandler) for x in lg.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        lg.addHandler(sh)
    return h


def detach(handler: logging.Handler) -> None:
    logging.getLogger(LOGGER).removeHandler(handler)
    handler.close()

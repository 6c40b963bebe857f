"""The run's text log (``run.log``): what ``tail -f`` shows, with a console echo for the notebook."""
from __future__ import annotations

import logging
from pathlib import Path

LOGGER = "hitbench"


def attach_file_log(path: Path) -> logging.Handler:
    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    lg = logging.getLogger(LOGGER)
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

"""Refusals before any work starts: settings that can never work fail at once, naming the numbers and
the fix, instead of turning every sample into the same error record."""
from __future__ import annotations

from typing import Any

from .errors import ConfigError


def check_before_model(job: Any) -> None:
    """What can be checked without the model: an image or mix run needs table images."""
    cfg = job.config
    if cfg.modality in ("image", "mix"):
        d = job.image_dir
        if not d.is_dir() or not any(d.glob("*.png")):
            what = "does not exist" if not d.is_dir() else "holds no .png table images"
            raise ConfigError("image_dir", str(d), f"a folder of table images (<FileName>.png); this one {what}",
                              f"draw them once with: python -m hitbench_utils render --data {job.data_path} --out "
                              "images/   then pass -p image_dir images/")


def check_fixed_part(preparer: Any, queries: list) -> None:
    """Refuse a ``max_input_tokens`` under which no question's instructions and question fit, even with an
    empty table (and no image): every sample would be a truncation error."""
    from .prompts import build_prompt
    from .prepare import Prepared
    from .records import SampleRecord

    cfg, seen, smallest = preparer.cfg, set(), None
    for q in queries:
        kind = (q.question_type, q.sub_qtype)
        if kind in seen:
            continue
        seen.add(kind)
        p = Prepared(SampleRecord.start(q, 1), build_prompt(preparer.templates, q, "text", cfg.fmt or "html", ""))
        base, reserve = preparer.fixed_tokens(p)
        smallest = base + reserve if smallest is None else min(smallest, base + reserve)
    if smallest is not None and smallest > cfg.max_input_tokens:
        raise ConfigError("max_input_tokens", cfg.max_input_tokens,
                          f"at least {smallest:,}: the shortest instructions and question (with the re-ask reminder) "
                          "take that many tokens before any table",
                          f"raise max_input_tokens (the default is 100000), e.g. -p max_input_tokens {max(smallest * 4, 8192)}")

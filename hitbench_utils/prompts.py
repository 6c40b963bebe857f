"""Prompt templates (a data file) → chat messages, and final-answer extraction (no torch here).

The user turn is always: table, then question, then the answer-format reminder (DESIGN.md §3), so all
questions on one (table, task prompt) share their prefix. A re-ask sends the same, already truncated,
prompt with a short reminder appended, never the previous answer.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .data import Query
from .errors import ConfigError

REQUIRED_KEYS = ("system", "table_intro", "format_names", "question", "answer_format", "reask")
_FINAL = re.compile(r"\[Final Answer\]:")
_FINAL_LOOSE = re.compile(r"Final Answer:", re.IGNORECASE)
_CODE = re.compile(r"import (?:pandas as pd|matplotlib\.pyplot as plt).*?plt\.show\(\)", re.DOTALL)


@dataclass(frozen=True)
class Templates:
    data: dict
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.data, sort_keys=True).encode()).hexdigest()

    def system(self, q: Query) -> str:
        s = self.data["system"]
        v = s.get(q.question_type, s.get("default"))
        if isinstance(v, dict):
            v = v.get(q.sub_qtype, v.get("default", s.get("default")))
        if v is None:
            raise ConfigError("prompts", self.source, f"a system prompt for {q.question_type!r} (or a 'default')",
                              "add it to the template file")
        return v

    def answer_format(self, q: Query) -> str:
        a = self.data["answer_format"]
        return a.get(q.sub_qtype) or a.get(q.question_type) or a["default"]


def load_templates(path: str | os.PathLike | None = None) -> Templates:
    """Our default wording, or a user's file with the same keys (e.g. the official prompts)."""
    if path in (None, "", "default"):
        text, source = resources.files("hitbench_utils.templates").joinpath("prompts_default.json").read_text("utf-8"), "default"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("prompts", str(path), "'default' or a path to a prompt template JSON file", "check the path")
        text, source = p.read_text("utf-8"), str(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("prompts", source, "a valid JSON template file", f"line {e.lineno}: {e.msg}") from None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ConfigError("prompts", source, f"a template with keys {', '.join(REQUIRED_KEYS)}",
                          f"add {', '.join(missing)} (see hitbench_utils/templates/prompts_default.json)")
    if "default" not in data["answer_format"]:
        raise ConfigError("prompts", source, "answer_format with a 'default' entry", "add answer_format.default")
    return Templates(data, source)


@dataclass(frozen=True)
class Prompt:
    """One question's prompt in parts: ``prefix`` (intro + table) is shared by questions on a table."""

    system: str
    intro: str
    table: str
    suffix: str            # question + answer-format reminder
    has_image: bool

    def messages(self, table: str | None = None, reask: str = "") -> list[dict]:
        """Chat messages; ``table`` overrides the table text (after truncation)."""
        content: list[dict] = [{"type": "image"}] if self.has_image else []
        body = self.intro + (self.table if table is None else table) + self.suffix + reask
        content.append({"type": "text", "text": body})
        return [{"role": "system", "content": self.system}, {"role": "user", "content": content}]


def build_prompt(t: Templates, q: Query, modality: str, fmt: str, table: str | None) -> Prompt:
    fmt_name = t.data["format_names"].get(fmt, fmt)
    intro = t.data["table_intro"][modality].format(format_name=fmt_name)
    suffix = t.data["question"].format(question=q.question) + t.answer_format(q)
    return Prompt(t.system(q), intro, table or "", suffix, modality in ("image", "mix"))


def reask_text(t: Templates) -> str:
    return t.data["reask"]


def extract_answer(response: str, visualization: bool = False) -> tuple[str, bool]:
    """(prediction, answer_format_ok): the text after the last '[Final Answer]:', else 'Final Answer:'."""
    text = response or ""
    for pattern in (_FINAL, _FINAL_LOOSE):
        hits = list(pattern.finditer(text))
        if hits:
            pred = text[hits[-1].end():].strip()
            if visualization and not _CODE.search(pred) and _CODE.search(text):
                pred = text  # the code sits above the final-answer line: let the chart scorer find it
            return pred, True
    return fallback_prediction(text, visualization), False


def fallback_prediction(response: str, visualization: bool) -> str:
    """No final-answer line: Visualization keeps the whole response, others the last non-empty line."""
    if visualization:
        return response or ""
    lines = [ln.strip() for ln in (response or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""

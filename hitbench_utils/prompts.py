"""Prompt templates (a data file) → chat messages, and final-answer extraction (no torch here).

A template's ``layout`` orders the user turn's parts: ``table`` (the table intro and the table text),
``instruction`` (the task instruction of the question's type; Data Analysis: of its sub-type),
``question`` and ``answer_format``. Everything before the table text is the prompt's ``intro``, and
everything after it its ``suffix``; the shared-prefix engine shares the KV of all that precedes the
suffix. The default layout, table first (DESIGN.md §3), therefore gives one prefix per table; the
``instruction-first`` template (the official RealHiTBench order) gives one per (table, instruction).
A re-ask sends the same, already truncated, prompt with a short reminder appended, never the previous
answer.
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
PARTS = ("table", "instruction", "question", "answer_format")
BUNDLED = {"default": "prompts_default.json", "instruction-first": "prompts_instruction_first.json"}
DEFAULT_LAYOUT = ["table", "instruction", "question", "answer_format"]
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

    @property
    def layout(self) -> list[str]:
        return list(self.data.get("layout", DEFAULT_LAYOUT))

    @property
    def separator(self) -> str:
        return self.data.get("separator", "\n\n")

    def _by_type(self, key: str, q: Query, required: bool) -> str | None:
        s = self.data.get(key)
        if isinstance(s, str) or s is None:
            return s
        v = s.get(q.question_type, s.get("default"))
        if isinstance(v, dict):
            v = v.get(q.sub_qtype, v.get("default", s.get("default")))
        if v is None and required:
            raise ConfigError("prompts", self.source, f"a {key} for {q.question_type!r} (or a 'default')",
                              "add it to the template file")
        return v

    def system(self, q: Query) -> str:
        return self._by_type("system", q, True)

    def instruction(self, q: Query) -> str:
        """The task instruction of the question's type ('' when the template has none)."""
        return self._by_type("instruction", q, "instruction" in self.layout and "instruction" in self.data) or ""

    def answer_format(self, q: Query) -> str:
        a = self.data["answer_format"]
        return a.get(q.sub_qtype) or a.get(q.question_type) or a["default"]

    def share_key(self, q: Query) -> str:
        """What a question's shared prefix depends on besides its table: the system prompt, plus the parts
        the layout puts before the table (so instruction-first groups by (table, instruction))."""
        before = self.layout[:self.layout.index("table")]
        return "\0".join([self.system(q)] + [_part(self, p, q) for p in before])


def _part(t: Templates, name: str, q: Query) -> str:
    if name == "instruction":
        return t.instruction(q)
    if name == "question":
        return t.data["question"].format(question=q.question)
    return t.answer_format(q)


def load_templates(path: str | os.PathLike | None = None) -> Templates:
    """A bundled template ('default': table first; 'instruction-first'), or a user's JSON file with the
    same keys, e.g. the official RealHiTBench prompts written in this format (docs/PROMPTS.md)."""
    name = "default" if path in (None, "") else str(path)
    if name in BUNDLED:
        text, source = resources.files("hitbench_utils.templates").joinpath(BUNDLED[name]).read_text("utf-8"), name
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("prompts", str(path), f"{' or '.join(map(repr, BUNDLED))}, or a path to a prompt "
                              "template JSON file", "check the path")
        text, source = p.read_text("utf-8"), str(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("prompts", source, "a valid JSON template file", f"line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError("prompts", source, "a JSON object with the template keys", "see docs/PROMPTS.md")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ConfigError("prompts", source, f"a template with keys {', '.join(REQUIRED_KEYS)}",
                          f"add {', '.join(missing)} (see hitbench_utils/templates/prompts_default.json)")
    if "default" not in data["answer_format"]:
        raise ConfigError("prompts", source, "answer_format with a 'default' entry", "add answer_format.default")
    layout = data.get("layout", DEFAULT_LAYOUT)
    if (not isinstance(layout, list) or sorted(layout) != sorted(set(layout)) or not set(layout) <= set(PARTS)
            or "table" not in layout or "question" not in layout):
        raise ConfigError("prompts", f"{source}: layout={layout!r}", f"a list of distinct parts from {', '.join(PARTS)} "
                          "that holds 'table' and 'question'", 'e.g. "layout": ["table", "instruction", "question", "answer_format"]')
    if "instruction" in layout and "instruction" not in data:
        raise ConfigError("prompts", f"{source}: layout={layout!r}", "an 'instruction' key when the layout names it",
                          "add the instructions per QuestionType, or drop 'instruction' from the layout")
    return Templates(data, source)


@dataclass(frozen=True)
class Prompt:
    """One question's prompt in parts: the user turn is ``intro`` + ``table`` + ``suffix``. All that
    precedes ``suffix`` (system, intro, table) is the prefix that questions on a table may share."""

    system: str
    intro: str
    table: str
    suffix: str            # everything after the table: instruction (table first), question, answer format
    has_image: bool

    def messages(self, table: str | None = None, reask: str = "") -> list[dict]:
        """Chat messages; ``table`` overrides the table text (after truncation)."""
        content: list[dict] = [{"type": "image"}] if self.has_image else []
        body = self.intro + (self.table if table is None else table) + self.suffix + reask
        content.append({"type": "text", "text": body})
        return [{"role": "system", "content": self.system}, {"role": "user", "content": content}]


def build_prompt(t: Templates, q: Query, modality: str, fmt: str, table: str | None) -> Prompt:
    """The parts in the template's layout; a part that renders empty (no instruction) is left out."""
    fmt_name = t.data["format_names"].get(fmt, fmt)
    intro = t.data["table_intro"][modality].format(format_name=fmt_name)
    sep, layout = t.separator, t.layout
    at = layout.index("table")
    before = [x for x in (_part(t, p, q) for p in layout[:at]) if x]
    after = [x for x in (_part(t, p, q) for p in layout[at + 1:]) if x]
    head = sep.join(before) + sep if before else ""
    suffix = sep + sep.join(after) if after else ""
    return Prompt(t.system(q), head + intro, table or "", suffix, modality in ("image", "mix"))


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

"""The one typed record per sample attempt: what the log stores and every report reads."""
from __future__ import annotations

import time
import traceback as tb
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .data import Query
from .errors import status_of

SCHEMA_VERSION = 1


@dataclass
class SampleRecord:
    id: int
    question_type: str
    sub_qtype: str
    file_name: str
    table_file: str | None = None          # the file stem read for the table/image: <file_name>_swap for SC
    status: str = "ok"                     # ok | oom | truncation | missing_input | exception | timeout
    attempt: int = 1                       # 1-based attempt number for this id
    error: str | None = None
    traceback: str | None = None
    tried: list[str] = field(default_factory=list)     # what was tried before giving up
    degraded: list[str] = field(default_factory=list)  # fallbacks taken on the way to ok
    question: str = ""
    reference: str = ""
    response: str | None = None
    prediction: str | None = None
    answer_format_ok: bool | None = None
    reasks: int = 0
    input_tokens_original: int | None = None
    input_tokens_sent: int | None = None
    input_tokens_server: int | None = None        # the prompt tokens a server reported (openai backend)
    output_tokens: int | None = None
    truncated: bool = False
    rows_dropped: int = 0
    image_size: list[int] | None = None            # original [width, height]
    image_size_sent: list[int] | None = None
    image_tokens: int | None = None
    started_at: float = 0.0                        # unix time
    latency_s: float = 0.0                         # prepare_s + generate_s (its share of its batches)
    prepare_s: float = 0.0
    generate_s: float = 0.0
    score_s: float = 0.0
    scores: dict[str, Any] = field(default_factory=dict)
    score_status: str | None = None                # scored | unscored | error | missing_input | not_run
    score_error: str | None = None
    score_detail: dict | None = None               # chart error/artifacts, judge model...
    structure: dict | None = None                  # SC only: pair, both protocols (scoring/structure.py)
    logged_at: float | None = None                 # unix time the log got it (orders the ranks' logs)

    @classmethod
    def start(cls, q: Query, attempt: int) -> "SampleRecord":
        return cls(id=q.id, question_type=q.question_type, sub_qtype=q.sub_qtype, file_name=q.file_name,
                   attempt=attempt, question=q.question, reference=q.reference, started_at=time.time())

    def fail(self, exc: BaseException) -> "SampleRecord":
        self.status = status_of(exc)
        self.error = f"{type(exc).__name__}: {exc}"
        self.traceback = getattr(exc, "hitbench_traceback", None) or "".join(
            tb.format_exception(type(exc), exc, exc.__traceback__))[-8000:]
        self.response = self.prediction = None
        return self

    def to_dict(self) -> dict:
        return asdict(self)


_ANNOTATION_TYPES = {"int": (int,), "str": (str,), "float": (int, float), "bool": (bool,), "dict": (dict,),
                     "list": (list,), "None": (type(None),)}


def _allowed(annotation: str) -> tuple[type, ...]:
    out: tuple[type, ...] = ()
    for part in annotation.split("|"):
        out += _ANNOTATION_TYPES[part.strip().split("[")[0]]
    return out


_FIELD_ANNOTATIONS = {f.name: (str(f.type), _allowed(str(f.type))) for f in fields(SampleRecord)}


def record_type_problem(obj: dict) -> str | None:
    """Why a log line cannot be a SampleRecord (a field of the wrong type, e.g. ``"attempt": "two"``), or None.
    Fields the record does not define (``rescored_at``, ...) are not checked."""
    for name, value in obj.items():
        spec = _FIELD_ANNOTATIONS.get(name)
        if spec is None:
            continue
        annotation, allowed = spec
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            return f"field {name!r} is {value!r} ({type(value).__name__}); a record needs {annotation}"
    return None

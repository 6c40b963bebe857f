"""The one typed record per sample attempt, and its typed degradations: what the log stores and every
report reads (fields, never prose).
"""
from __future__ import annotations

import dataclasses
import time
import traceback as tb
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .data import Query
from .errors import RunLogError, status_of

SCHEMA_VERSION = 2

# What a sample went through on its way to its record (DESIGN.md §4: "the record says what was tried").
DEGRADATION_KINDS = (
    "batch_split",          # an OOM split the batch it was in
    "token_budget",         # its max_input_tokens was lowered after an OOM
    "image_halved",         # its image's pixels were halved (to fit the limit, or after an OOM)
    "prefix_fallback",      # shared-prefix work failed; it ran in plain batches
    "reask_failed",         # a re-ask failed; the first answer is kept
    "degradation_failed",   # the OOM ladder could not take its next step
    "table_encoding",       # the table was not UTF-8 and was decoded with table_encoding
    "failed",               # the attempt ended in an error (the last entry of ``tried``)
    "legacy",               # a prose entry from a schema-1 log
)


@dataclass(frozen=True)
class Degradation:
    """One step taken on the way to a record. ``transient`` marks an outage (a server down), not the
    sample: an ok record carrying a transient degradation is retried on resume like an error."""

    kind: str
    detail: str = ""
    round: int = 0                  # the re-ask round it happened in (0: the first ask)
    before: Any = None              # e.g. a token limit or an image size before the step
    after: Any = None
    transient: bool = False

    def __post_init__(self) -> None:
        if self.kind not in DEGRADATION_KINDS:
            raise ValueError(f"degradation kind {self.kind!r} not in {DEGRADATION_KINDS}")

    @classmethod
    def from_dict(cls, d: Any) -> "Degradation":
        if isinstance(d, str):
            return cls("legacy", d)
        if not isinstance(d, dict) or d.get("kind") not in DEGRADATION_KINDS:
            raise ValueError(f"not a degradation: {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """One line for people (debug tables, the report); programs read the fields."""
        change = f" {self.before} -> {self.after}" if self.before is not None or self.after is not None else ""
        where = f" (re-ask {self.round})" if self.round else ""
        return f"{self.kind}{change}{': ' + self.detail if self.detail else ''}{where}"


def describe(entries: list | None) -> str:
    """``tried`` / ``degraded`` of a logged record (dicts, or a schema-1 log's strings) as one line."""
    return "; ".join(Degradation.from_dict(d).text() for d in entries or [])


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
    permanent: bool = False                # an error that no retry can change (resume does not retry it)
    tried: list[Degradation] = field(default_factory=list)     # what was tried before giving up
    degraded: list[Degradation] = field(default_factory=list)  # fallbacks taken on the way to ok
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
    extra: dict[str, Any] = field(default_factory=dict)   # fields this version does not know (kept, not lost)

    @classmethod
    def start(cls, q: Query, attempt: int) -> "SampleRecord":
        return cls(id=q.id, question_type=q.question_type, sub_qtype=q.sub_qtype, file_name=q.file_name,
                   attempt=attempt, question=q.question, reference=q.reference, started_at=time.time())

    def fail(self, exc: BaseException, *, permanent: bool | None = None) -> "SampleRecord":
        self.status = status_of(exc)
        self.error = f"{type(exc).__name__}: {exc}"
        self.traceback = getattr(exc, "hitbench_traceback", None) or "".join(
            tb.format_exception(type(exc), exc, exc.__traceback__))[-8000:]
        self.permanent = bool(getattr(exc, "permanent", False)) if permanent is None else permanent
        self.response = self.prediction = None
        return self

    def degrade(self, kind: str, detail: str = "", **kw: Any) -> Degradation:
        d = Degradation(kind, detail, **kw)
        if d not in self.degraded:
            self.degraded.append(d)
        return d

    @property
    def transient(self) -> bool:
        """An ok record that an outage degraded: worth retrying on resume."""
        return self.status == "ok" and any(d.transient for d in self.degraded)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SampleRecord":
        """A logged record (schema 1 or 2) as a typed record. A field of the wrong type is an error that
        names the field, never a crash later in a reader."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {"extra": {}}
        for k, v in d.items():
            if k not in fields or k == "extra":
                kw["extra"][k] = v
            elif k in ("tried", "degraded"):
                if not isinstance(v, list):
                    raise RunLogError(f"record id={d.get('id')!r}: field {k!r} is {v!r}, not a list")
                try:
                    kw[k] = [Degradation.from_dict(x) for x in v]
                except ValueError as e:
                    raise RunLogError(f"record id={d.get('id')!r}: field {k!r}: {e}") from None
            else:
                kw[k] = v
        for k in ("id", "question_type", "sub_qtype", "file_name"):
            kw.setdefault(k, "" if k != "id" else None)
        problem = record_type_problem(d)
        if problem:
            raise RunLogError(f"record id={d.get('id')!r}: {problem}")
        return cls(**kw)



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

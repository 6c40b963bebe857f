"""The one typed record per sample attempt, and its typed degradations: what the log stores and every
report reads (fields, never prose).
"""
from __future__ import annotations

import dataclasses
import time
import traceback as tb
from dataclasses import asdict, dataclass, field
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
        check_record_types(d)
        return cls(**kw)


# The types a logged record's fields must have (None allowed where the field is optional).
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (int,), "status": (str,), "attempt": (int,), "reasks": (int,), "rows_dropped": (int,),
    "truncated": (bool,), "permanent": (bool,), "answer_format_ok": (bool, type(None)),
    "input_tokens_original": (int, type(None)), "input_tokens_sent": (int, type(None)),
    "output_tokens": (int, type(None)), "latency_s": (int, float), "started_at": (int, float),
    "error": (str, type(None)), "response": (str, type(None)), "prediction": (str, type(None)),
    "scores": (dict,), "tried": (list,), "degraded": (list,),
}


def check_record_types(d: dict) -> None:
    """Raise ``RunLogError`` naming the first field whose value has the wrong type."""
    for k, types in _TYPES.items():
        if k in d and (not isinstance(d[k], types) or (isinstance(d[k], bool) and bool not in types)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise RunLogError(f"record id={d.get('id')!r}: field {k!r} is {d[k]!r}, expected {want}")

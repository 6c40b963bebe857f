"""RealHiTBench QA files and the files each query points at (no torch here).

A malformed QA file fails before any work starts. A missing, empty or Git-LFS-stub table, image or
xlsx is a *sample* problem: it raises ``MissingInputError``, which the run turns into an error record.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, DataError, InputDecodeError, MissingInputError

log = logging.getLogger("hitbench")

MODALITIES = ("text", "image", "mix")
FORMATS = ("html", "latex", "csv", "markdown", "json")
FORMAT_EXT = {"html": "html", "latex": "txt", "csv": "csv", "markdown": "md", "json": "json"}
QA_FILES = ("QA_final.json", "QA_long.json", "QA_structure.json")
QUESTION_TYPES = ("Fact Checking", "Numerical Reasoning", "Data Analysis", "Structure Comprehending", "Visualization")
REQUIRED_FIELDS = ("id", "FileName", "Question", "QuestionType", "SubQType", "ProcessedAnswer")
LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"


@dataclass(frozen=True)
class Query:
    """One benchmark question; ``reference`` is the QA item's ProcessedAnswer."""

    id: int
    file_name: str
    question: str
    question_type: str
    sub_qtype: str
    reference: str
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def chart_type(self) -> str:
        """'LineChart' for 'LineChart Generation' (the first word of the sub-type)."""
        return (self.sub_qtype.split() or [""])[0]


def check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(name, value, ", ".join(allowed), f"pass one of them, e.g. -p {name} {allowed[0]}")
    return value


def check_data_path(data_path: str | os.PathLike) -> Path:
    """The dataset folder, or a clear refusal: it must exist and be a folder."""
    p = Path(data_path)
    if not p.is_dir():
        what = "is a file, not a folder" if p.exists() else "does not exist"
        raise ConfigError("data_path", str(data_path), f"a RealHiTBench folder (QA_final.json, html/, latex/ ...); this path {what}",
                          "pass the folder that holds QA_final.json, or leave data_path out for the embedded sample")
    return p


def resolve_qa_file(data_path: str | os.PathLike, qa_file: str | os.PathLike) -> Path:
    """A QA file name inside ``data_path`` (QA_final.json, ...) or a path to any QA file."""
    p = Path(qa_file)
    cand = p if p.is_absolute() or p.exists() else Path(data_path) / p
    if not cand.is_file():
        raise ConfigError("qa_file", str(qa_file), f"{', '.join(QA_FILES)} inside data_path ({data_path}), or a path to a QA JSON file",
                          "check data_path and qa_file")
    return cand


def load_queries(path: str | os.PathLike, warn: bool = True) -> list[Query]:
    """Parse and validate a whole QA file up front, so a bad item fails the run before any work
    (``warn``: log unknown QuestionTypes; off for a second read of the same file)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not valid UTF-8 (line {line}, byte offset {e.start}: {raw[e.start:e.start + 4]!r}). "
                        "Fix: restore the file from the dataset, or convert it to UTF-8") from None
    try:
        blob = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
                        "Fix: restore the file from the dataset") from None
    items = blob.get("queries") if isinstance(blob, dict) else blob
    if not isinstance(items, list):
        raise DataError(f"{path}: expected {{\"queries\": [...]}} or a list of questions, got {type(blob).__name__}")
    out, seen, unknown = [], set(), {}
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise DataError(f"{path}: item #{i} is a {type(it).__name__}, not an object")
        missing = [f for f in REQUIRED_FIELDS if f not in it]
        if missing:
            raise DataError(f"{path}: item #{i} (id={it.get('id', '?')}) lacks field(s) {', '.join(missing)}; "
                            f"every item needs {', '.join(REQUIRED_FIELDS)}")
        qid = it["id"]
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise DataError(f"{path}: item #{i} has id={qid!r}, a {type(qid).__name__}; ids must be JSON integers "
                            "(not floats, booleans or strings). Fix: restore the file from the dataset")
        if qid in seen:
            raise DataError(f"{path}: id {qid} appears more than once; ids must be unique within a QA file")
        seen.add(qid)
        qtype = str(it["QuestionType"])
        if qtype not in QUESTION_TYPES:
            unknown.setdefault(qtype, []).append(qid)
        out.append(Query(qid, str(it["FileName"]), str(it["Question"]), qtype,
                         str(it["SubQType"] or ""), _as_text(it["ProcessedAnswer"]), it))
    for qtype, ids in unknown.items() if warn else ():
        log.warning("%s: %d question(s) have the unknown QuestionType %r (ids %s); they get the default prompt "
                    "and their scores are kept apart (aggregates' unknown_question_types); known: %s", path, len(ids),
                    qtype, ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else ""), ", ".join(QUESTION_TYPES))
    return out


def _as_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def parse_ids(ids: Any) -> list[int] | None:
    """ids as papermill passes them: None, a list, or JSON/comma text such as "[1, 2]" or "1,2"."""
    if ids is None or ids == "" or ids == []:
        return None
    if isinstance(ids, str):
        s = ids.strip()
        try:
            ids = json.loads(s) if s.startswith("[") else [x for x in s.replace(",", " ").split()]
        except json.JSONDecodeError:
            raise ConfigError("ids", ids, "a list of integers, or its JSON text like \"[1, 2, 3]\"") from None
    if isinstance(ids, int) or isinstance(ids, float):
        ids = [ids]
    bad = [x for x in ids if isinstance(x, (bool, float))] if isinstance(ids, (list, tuple)) else []
    if bad:
        raise ConfigError("ids", bad, "integers only: a float or boolean id (e.g. 3.0 or true) is refused, not rounded",
                          "write the ids as whole numbers, e.g. [1, 2, 3]")
    try:
        return [int(x) for x in ids]
    except (TypeError, ValueError):
        raise ConfigError("ids", ids, "a list of integers, or its JSON text like \"[1, 2, 3]\"") from None


def select(queries: Iterable[Query], *, ids: Any = None, limit: int | None = None,
           question_type: str | Sequence[str] | None = None) -> list[Query]:
    """Filter by ids, then question type, then take the first ``limit``; unknown ids are an error."""
    qs = list(queries)
    wanted = parse_ids(ids)
    if wanted is not None:
        by_id = {q.id: q for q in qs}
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise ConfigError("ids", unknown, f"ids present in the QA file ({min(by_id)}..{max(by_id)})" if by_id else "none (empty QA file)",
                              "drop the unknown ids or choose the QA file they belong to")
        qs = [by_id[i] for i in dict.fromkeys(wanted)]
    if question_type:
        types = [question_type] if isinstance(question_type, str) else list(question_type)
        for t in types:
            check_choice("question_type", t, QUESTION_TYPES)
        qs = [q for q in qs if q.question_type in types]
    if limit is not None:
        if int(limit) < 0:
            raise ConfigError("limit", limit, "a non-negative integer or None")
        qs = qs[: int(limit)]
    return qs


def is_lfs_pointer(path: str | os.PathLike) -> bool:
    """True for a Git LFS pointer stub (what a clone without git-lfs leaves instead of the file)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_MAGIC)) == LFS_MAGIC
    except OSError:
        return False


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}. Fix: restore it from the dataset "
                                "(or check data_path / image_dir)")
    if is_lfs_pointer(path):
        raise MissingInputError(f"{what} {path} is a Git LFS pointer stub ({path.stat().st_size} bytes), not the file. "
                                "Fix: fetch the LFS object (git lfs install && git lfs pull in the dataset clone)")
    if path.stat().st_size == 0:
        raise MissingInputError(f"{what} {path} is empty (0 bytes). Fix: restore it from the dataset")


def check_inside(path: Path, folder: str | os.PathLike, file_name: str, what: str) -> Path:
    """``path`` itself when it resolves (symlinks followed) inside ``folder``; else MissingInputError, and the
    file is never opened: a FileName such as '../../x', an absolute path or an escaping symlink is not data."""
    root = Path(folder).resolve()
    target = path.resolve()
    if target != root and root not in target.parents:
        raise MissingInputError(f"{what} for FileName {file_name!r} resolves to {target}, outside its folder {root}; "
                                "it was not opened. Fix: a FileName must name a file inside data_path "
                                "(no '..', no absolute path, no symlink that leaves the folder)")
    return path


def table_path(data_path: str | os.PathLike, fmt: str, file_name: str) -> Path:
    return Path(data_path) / fmt / f"{file_name}.{FORMAT_EXT[fmt]}"


def image_path(image_dir: str | os.PathLike, file_name: str) -> Path:
    return Path(image_dir) / f"{file_name}.png"


def xlsx_path(data_path: str | os.PathLike, file_name: str) -> Path:
    return Path(data_path) / "tables" / f"{file_name}.xlsx"


def check_encoding(encoding: str | None) -> str:
    """``table_encoding``: 'utf-8' (strict, the default) or a codec Python knows, e.g. 'gb18030'."""
    try:
        return codecs.lookup(encoding or "utf-8").name
    except (LookupError, TypeError):
        raise ConfigError("table_encoding", encoding, "'utf-8' or an encoding Python knows (e.g. 'gb18030', 'latin-1')",
                          "pass the encoding the non-UTF-8 table files were written in") from None


def decode_table(raw: bytes, path: Path, encoding: str | None = None) -> tuple[str, str | None]:
    """(text, note). UTF-8 first, strictly; a file that is not valid UTF-8 is decoded with ``encoding`` when
    one is given (the note says so), else it is an InputDecodeError naming the file and the byte offset."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        enc = check_encoding(encoding)
        bad = f"not valid UTF-8 at byte offset {e.start} ({raw[e.start:e.start + 4]!r})"
        if enc == "utf-8":
            raise InputDecodeError(f"table file {path} is {bad}. Fix: convert it to UTF-8, or pass table_encoding "
                                   "with its encoding (e.g. -p table_encoding gb18030)") from None
    try:
        return raw.decode(enc), f"table {path.name} decoded as {enc}: {bad}"
    except UnicodeDecodeError as e2:
        raise InputDecodeError(f"table file {path} is {bad}, and not valid {enc} either (byte offset {e2.start}). "
                               "Fix: convert it to UTF-8, or pass the right table_encoding") from None


def read_table(data_path: str | os.PathLike, fmt: str, file_name: str, encoding: str | None = None,
               notes: list[str] | None = None) -> str:
    """The table text; a missing, stub, escaping or undecodable file raises MissingInputError (a subclass).
    ``notes`` (the record's ``degraded`` list) gets a line when the table_encoding fallback was used."""
    path = check_inside(table_path(data_path, fmt, file_name), Path(data_path) / fmt, file_name, f"{fmt} table")
    _check_file(path, f"{fmt} table")
    text, note = decode_table(path.read_bytes(), path, encoding)
    if note and notes is not None:
        notes.append(note)
    if not text.strip():
        raise MissingInputError(f"{fmt} table {path} holds only whitespace. Fix: restore it from the dataset")
    return text


def load_image(image_dir: str | os.PathLike, file_name: str):
    """Open and fully decode the PNG now, so a corrupt file fails here, as a missing input."""
    from PIL import Image, UnidentifiedImageError

    path = check_inside(image_path(image_dir, file_name), image_dir, file_name, "table image")
    _check_file(path, "table image")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MissingInputError(f"table image {path} cannot be decoded ({e}). Fix: re-render or restore it") from None


def inputs_present(data_path: str | os.PathLike, image_dir: str | os.PathLike, fmt: str | None, modality: str,
                   file_name: str) -> bool:
    """Whether a query's table (and image) files are now there and real (not LFS stubs): a permanent
    missing_input record whose files were restored is run again on resume."""
    paths = ([table_path(data_path, fmt, file_name)] if fmt else []) + (
        [image_path(image_dir, file_name)] if modality in ("image", "mix") else [])
    return all(p.is_file() and p.stat().st_size > 0 and not is_lfs_pointer(p) for p in paths)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

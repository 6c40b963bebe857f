r"""Cut an over-long table at row boundaries so that it fits a token budget (DESIGN.md §5).

The table is tokenized ONCE (newline-aligned chunks encoded in parallel) and the cut is found on the
token offsets by binary search over row ends. The result is tokenized once more, since BPE merges at
the seams can move the count by a token or two and the budget is hard: an overshoot becomes slack.

Policy: preamble + header rows + as many leading body rows as fit + a visible marker with the numbers
+ trailer. If not even the header fits whole (one gigantic row; society-table45.md has 32 lines of
~33K tokens), the cut falls inside a row at a token boundary, backed off to a cell edge, and the marker
says so. ``TruncationError`` only when preamble + marker + trailer alone exceed the budget.

Markers: html ``<tr><td colspan=N>[...]</td></tr>``; latex a plain text row ending in ``\\``; csv a
one-cell quoted record; markdown a ``| [...] |`` line; json a final *string item* of the top-level
array, so the result stays valid JSON (a cut inside one item, the degenerate case, cannot be valid).
"""
from __future__ import annotations

import csv
import json
import os
import re
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from .errors import TruncationError

FORMATS = ("html", "latex", "csv", "markdown", "json")
# Multi-level headers in RealHiTBench are usually 2-4 rows, often under a title row; in the csv copies
# the first mostly-numeric record is at index <= 5 in ~70% of files. Body rows are kept after the header
# anyway; the count decides when a budget too small for it whole makes the cut fall inside a row.
DEFAULT_HEADER_ROWS = 5
OMISSION_MARKER = "[... {dropped:,} of {total:,} rows omitted to fit the token limit ...]"
PARTIAL_MARKER = ("[... row {row:,} cut short; {dropped:,} of {total:,} rows omitted or incomplete"
                  " to fit the token limit ...]")
_MAX_TRIES = 8
_CHUNK_CHARS = 250_000  # below this, one chunk: the parallel pass is not worth its seam checks
_BLANK = re.compile(r"[^\S\r\n]*[\r\n]")  # a blank line: a whitespace pre-token may run through it


@dataclass(frozen=True)
class TableCut:
    """What the run loop records: input_tokens_original/sent, truncated, rows_dropped (DESIGN.md §5)."""
    text: str
    tokens_original: int
    tokens_kept: int
    truncated: bool
    rows_total: int
    rows_dropped: int
    header_rows: int


@dataclass(frozen=True)
class TableRows:
    """``table == preamble + table[rows[0][0]:rows[-1][1]] + trailer``; rows are char spans in order."""
    preamble: str
    rows: list[tuple[int, int]]
    trailer: str
    header_count: int


def _backend(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (what ``__call__`` uses)."""
    bt = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if not hasattr(bt, "encode_batch"):
        raise TypeError("truncation needs a fast (Rust-backed) tokenizer for token offsets")
    # A padded/truncating transformers call (e.g. processor(..., padding=True)) leaves these on, which
    # would pad our chunks or cut the table; transformers re-sets both on each call, so clearing is safe.
    if bt.padding is not None or bt.truncation is not None:
        bt.no_padding()
        bt.no_truncation()
    return bt


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` without special tokens; same ids as ``tokenizer(text, add_special_tokens=False)``."""
    return len(_backend(tokenizer).encode(text, add_special_tokens=False)) if text else 0


class _Offsets:
    """Char offsets of every token of one text, from one chunk-parallel pass (offsets read lazily)."""

    def __init__(self, tokenizer, text: str) -> None:
        bt, cuts = _backend(tokenizer), [0]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = min(cpus, len(text) // _CHUNK_CHARS)
        for i in range(1, n):  # seams after a newline that starts a non-blank line: no pre-token spans them
            p = text.find("\n", max(cuts[-1], len(text) * i // n)) + 1
            while 0 < p < len(text) and _BLANK.match(text, p):
                p = text.find("\n", p) + 1
            if p <= cuts[-1] or p >= len(text):
                break
            a, b = text[max(0, p - 512):p], text[p:p + 512]  # check the seam on a window around it
            if sum(len(bt.encode(x, add_special_tokens=False)) for x in (a, b)) == len(
                    bt.encode(a + b, add_special_tokens=False)):
                cuts.append(p)
        cuts.append(len(text))
        self.encs = bt.encode_batch([text[a:b] for a, b in zip(cuts, cuts[1:])], add_special_tokens=False)
        self.chars, self.toks, self.n = cuts[:-1], [0, *accumulate(len(e) for e in self.encs)], len(text)
        self.total = self.toks[-1]

    def start(self, i: int) -> int:
        """Char start of token ``i`` (len(text) past the end)."""
        if i >= self.total:
            return self.n
        c = bisect_right(self.toks, i) - 1
        return self.chars[c] + self.encs[c].token_to_chars(i - self.toks[c])[0]

    def before(self, pos: int) -> int:
        """Tokens starting before char ``pos`` (a token straddling ``pos`` counts as before)."""
        return bisect_left(range(self.total), pos, key=self.start)


# Splitters return (preamble end, row spans, trailer start, header count).
_LINE, _WS, _EOL = re.compile(r"[^\n]*\n|[^\n]+\Z"), re.compile(r"\s*"), re.compile(r"[ \t]*\r?\n?")
_MD_SEP = re.compile(r"\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*")


def _lines(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _LINE.finditer(text)]


def _split_markdown(text: str, h: int):
    """Lines; header = lines through the ``|---|`` separator plus data lines up to ``h`` content rows."""
    rows = _lines(text)
    sep = next((i for i, (a, b) in enumerate(rows[:50]) if _MD_SEP.fullmatch(text, a, b)), None)
    return 0, rows, len(text), h if sep is None else max(sep, h) + 1


def _split_csv(text: str, h: int):
    """Records, by the csv module fed one line at a time: a quoted cell may span lines."""
    lines, rows = _lines(text), []
    reader = csv.reader(text[a:b] for a, b in lines)
    try:
        for _ in reader:  # line_num: lines pulled so far; the reader pulls none beyond the record
            rows.append((rows[-1][1] if rows else 0, lines[reader.line_num - 1][1]))
    except csv.Error:
        rows = lines
    return 0, rows, len(text), h


def _split_json(text: str, h: int):
    """Items of a top-level array, spans found by raw_decode; anything else is one unit."""
    if not text.lstrip().startswith("["):
        return 0, [], len(text), h
    dec, rows, pos = json.JSONDecoder(), [], _WS.match(text, text.index("[") + 1).end()
    try:
        while pos < len(text) and text[pos] != "]":
            rows.append((pos, dec.raw_decode(text, pos)[1]))
            pos = _WS.match(text, rows[-1][1]).end()
            pos = _WS.match(text, pos + 1).end() if text.startswith(",", pos) else pos
    except ValueError:
        rows = []
    return (rows[0][0], rows, rows[-1][1], h) if rows else (0, [], len(text), h)


_TAG = re.compile(r"<(/?)(tr|table|thead)\b[^>]*>", re.I)
_CELL, _COLSPAN = re.compile(r"<t([dh])\b([^>]*)>", re.I), re.compile(r"colspan\s*=\s*[\"']?(\d+)", re.I)


def _split_html(text: str, h: int):
    """Top-level ``<tr>`` elements (rows of nested tables stay inside their cell); each row runs to the
    next one, so text between rows stays with the row before it. Header = marked rows, else ``h``."""
    starts, end, depth, is_open, thead_end = [], None, 0, False, None
    for m in _TAG.finditer(text):
        close, name = m.group(1), m.group(2).lower()
        if name == "table":
            if close and depth == 1 and is_open:
                end, is_open = m.start(), False
            depth += -1 if close else 1
        elif name == "thead":
            thead_end = m.start() if close and depth <= 1 and thead_end is None else thead_end
        elif depth <= 1:
            if not close:
                starts.append(m.start())
                is_open = True
            elif is_open:
                end, is_open = m.end(), False
    if not starts:
        return 0, [], len(text), h
    end = len(text) if is_open or end is None or end < starts[-1] else _EOL.match(text, end).end()
    rows = list(zip(starts, starts[1:])) + [(starts[-1], end)]
    marked = bisect_left(starts, thead_end) if thead_end is not None else 0
    while thead_end is None and marked < len(rows) and {
            c.group(1).lower() for c in _CELL.finditer(text, *rows[marked])} == {"h"}:
        marked += 1  # leading rows made only of <th> cells
    return starts[0], rows, end, marked or h


_BEGIN = re.compile(r"\\begin\{tabular\}\s*(?:\[[^\]]*\])?\s*(?:\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\})?")
_TEX = re.compile(r"\\begin\{tabular\}|\\end\{tabular\}|\\\\|\\.|[{}]", re.S)
_RULES = re.compile(r"(?:\s|\\(?:hline|toprule|midrule|bottomrule)\b|\\cline\{[^}]*\})*")


def _split_latex(text: str, h: int):
    """Top-level ``\\\\`` row ends of the outer tabular: braces and nested tabulars (cells with line
    breaks) are tracked. A last row without ``\\\\`` is a row; files with no tabular are split by line."""
    m = _BEGIN.search(text)
    if not m:
        return 0, _lines(text), len(text), h
    body = start = _EOL.match(text, m.end()).end()
    rows, depth, nest, end = [], 0, 0, len(text)
    for t in _TEX.finditer(text, body):
        s = t.group()
        if s in ("{", "}"):
            depth = max(0, depth + (1 if s == "{" else -1))
        elif s == "\\begin{tabular}":
            nest += 1
        elif s == "\\end{tabular}" and nest:
            nest -= 1
        elif s == "\\end{tabular}":
            end = t.start()
            break
        elif s == "\\\\" and not depth and not nest:
            rows.append((start, _EOL.match(text, t.end()).end()))
            start = rows[-1][1]
    if not _RULES.fullmatch(text, start, end):  # a last row without \\ (or only rules: trailer)
        rows.append((start, end))
    return body, rows, rows[-1][1] if rows else start, h


_SPLIT = {"html": _split_html, "latex": _split_latex, "csv": _split_csv, "markdown": _split_markdown, "json": _split_json}


def split_rows(table: str, fmt: str, header_rows: int = DEFAULT_HEADER_ROWS) -> TableRows:
    """Rows (char spans) of ``table`` in ``fmt``; odd input never raises: no rows = the text is one unit."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not one of {FORMATS}")
    pre, rows, post, head = _SPLIT[fmt](table, header_rows) if table else (0, [], 0, 0)
    if not rows and table:
        pre, rows, post = 0, [(0, len(table))], len(table)
    return TableRows(table[:pre], rows, table[post:], max(0, min(head, len(rows))))


# Where a cut inside a row backs off to (the last cell edge), and whether the edge char is kept.
_CELL_EDGE = {"html": (">", 1), "latex": ("&", 0), "csv": (",", 0), "markdown": ("|", 1), "json": (",", 0)}
_SEAM = 4  # tokens reserved for the marker's line breaks and BPE merges at the two seams
_BACKOFF = 64  # at most this many tokens are given up to end a cut-short row at a cell edge


def _marker_block(table: str, fmt: str, parts: TableRows, msg: str, kept: int, partial: bool, cut: int,
                  colspan: int) -> str:
    """The marker as a row of ``fmt``, to go between table[:cut] and the trailer."""
    nl = "\r\n" if "\r\n" in table else "\n"
    if fmt == "json":  # a string item after the kept ones, indented like them
        indent = table[table.rfind("\n", 0, parts.rows[0][0]) + 1:parts.rows[0][0]]
        return (nl if partial else "," + nl + (indent if not indent.strip() else "") if kept else "") + json.dumps(msg)
    line = {"html": f'<tr><td colspan="{colspan}">{msg}</td></tr>', "latex": msg + r" \\",
            "csv": f'"{msg}"', "markdown": f"| {msg} |"}[fmt]
    lead = "" if fmt == "html" or table.endswith("\n", 0, cut) or cut == 0 else nl
    if partial and fmt == "latex":
        lead = r" \\" + nl  # end the cut-short row, so the marker is a row of its own
    tail = "" if not parts.trailer and not table.endswith("\n") else nl
    return lead + line + tail


_RECENT: "OrderedDict[tuple, tuple[Any, str, TableRows, _Offsets]]" = OrderedDict()
_RECENT_SIZE = 4


def _analysed(table: str, fmt: str, header_rows: int, tokenizer) -> tuple["TableRows", _Offsets]:
    """Rows and token offsets of a table, kept for the last few tables: every question on a table cuts
    the same text (with budgets a few tokens apart), and the tokenization is most of a cut's time."""
    key = (id(tokenizer), fmt, header_rows, len(table), hash(table))
    hit = _RECENT.get(key)
    if hit is not None and hit[0] is tokenizer and hit[1] == table:   # the entry holds both, so ids stay unique
        _RECENT.move_to_end(key)
        return hit[2], hit[3]
    parts, offs = split_rows(table, fmt, header_rows), _Offsets(tokenizer, table)
    _RECENT[key] = (tokenizer, table, parts, offs)
    while len(_RECENT) > _RECENT_SIZE:
        _RECENT.popitem(last=False)
    return parts, offs


def truncate_table(table: str, fmt: str, *, budget: int, tokenizer,
                   header_rows: int = DEFAULT_HEADER_ROWS) -> TableCut:
    """``table`` cut to at most ``budget`` tokens at row boundaries for ``fmt`` (see module docstring)."""
    parts, offs = _analysed(table, fmt, header_rows, tokenizer)
    total_rows, head = len(parts.rows), parts.header_count
    if offs.total <= budget or not table:  # an empty table is the caller's business: returned as is
        return TableCut(table, offs.total, offs.total, False, total_rows, 0, head)
    pre_end, post = len(parts.preamble), len(table) - len(parts.trailer)
    ends = [pre_end] + [b for _, b in parts.rows]
    pre_tok, post_tok = offs.before(pre_end), offs.total - offs.before(post)
    colspan = max([1] + [sum(int(m.group(1)) if (m := _COLSPAN.search(c.group(2))) else 1  # widest header row
                             for c in _CELL.finditer(table, a, b)) for a, b in parts.rows[:max(head, 1)]])
    # The longest marker (partial wording, largest numbers) + seam reserve bounds every marker we emit.
    longest = PARTIAL_MARKER.format(row=total_rows, dropped=total_rows, total=total_rows)
    worst = count_tokens(tokenizer, _marker_block(table, fmt, parts, longest, 0, True, 0, colspan)) + _SEAM
    slack = 0
    for _ in range(_MAX_TRIES):
        room = budget - slack - worst - post_tok  # tokens left for preamble + kept rows
        if room < pre_tok:
            raise TruncationError(
                f"{fmt} table of {offs.total:,} tokens cannot fit {budget:,} tokens: preamble {pre_tok:,}"
                f" + marker {worst:,} + trailer {post_tok:,} (+ {slack} seam slack) already exceed it")
        # the most whole rows (at least the header, fewer than all) whose prefix fits
        fits = bisect_right(range(head, total_rows), room, key=lambda k: offs.before(ends[k]))
        kept, partial = head + fits - 1, False
        if fits:
            cut = ends[kept]
        else:  # not even the header fits whole: cut inside a row at a token boundary
            tok_cut = min(offs.start(room), post)
            kept = bisect_right(ends, tok_cut) - 1
            cut, partial = ends[kept], kept < total_rows and tok_cut > parts.rows[kept][0]
            if partial:  # end the cut-short row at a cell edge, if one is near
                (sep, keep_sep), row_start = _CELL_EDGE[fmt], parts.rows[kept][0]
                edge = table.rfind(sep, max(row_start + 1, offs.start(max(0, room - _BACKOFF))), tok_cut)
                cut = edge + keep_sep if edge > row_start else tok_cut
        msg = (PARTIAL_MARKER if partial else OMISSION_MARKER).format(
            row=kept + 1, dropped=total_rows - kept, total=total_rows)
        text = table[:cut] + _marker_block(table, fmt, parts, msg, kept, partial, cut, colspan) + table[post:]
        n = count_tokens(tokenizer, text)
        if n <= budget:
            return TableCut(text, offs.total, n, True, total_rows, total_rows - kept, min(head, kept))
        slack += n - budget
    raise TruncationError(f"{fmt} table of {offs.total:,} tokens: no cut under {budget:,} in {_MAX_TRIES} tries")

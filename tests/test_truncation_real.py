"""Truncation on the real RealHiTBench tables with the real Qwen tokenizer (needs $HITBENCH_SHARED).

The fixtures ``real_data`` (runs $HITBENCH_SHARED/bin/realhitbench) and ``qwen_tokenizer`` come from
conftest.py and skip with the reason when the shared data or tokenizers/qwen2 folder is absent.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path

import pytest

from hitbench_utils import truncation as T
from hitbench_utils.errors import TruncationError

pytestmark = [pytest.mark.shared, pytest.mark.slow]

EXT = {"html": "html", "latex": "txt", "csv": "csv", "markdown": "md", "json": "json"}
LFS = b"version https://git-lfs.github.com/spec/v1"


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")  # 13 latex files are not UTF-8


def table_files(data: Path, fmt: str) -> list[Path]:
    """Real table files of ``fmt`` (LFS pointer stubs left out: the caller filters them)."""
    out = []
    for p in sorted((data / fmt).glob(f"*.{EXT[fmt]}")):
        with p.open("rb") as f:
            if not f.read(len(LFS)) == LFS:
                out.append(p)
    return out


def check(table: str, fmt: str, cut: T.TableCut, budget: int, tok) -> tuple[int, bool]:
    """Invariants every truncated result holds; returns (whole rows kept, cut inside a row?)."""
    parts = T.split_rows(table, fmt)
    ends = [len(parts.preamble)] + [b for _, b in parts.rows]
    kept = cut.rows_total - cut.rows_dropped
    assert cut.truncated and cut.tokens_original > budget
    assert cut.tokens_kept == T.count_tokens(tok, cut.text) <= budget
    assert cut.text.startswith(table[:ends[kept]])  # preamble + header + whole rows, verbatim
    assert cut.text.endswith(parts.trailer)
    assert cut.header_rows == min(parts.header_count, kept)
    partial = "cut short;" in cut.text
    marker = (T.PARTIAL_MARKER.format(row=kept + 1, dropped=cut.rows_dropped, total=cut.rows_total) if partial
              else T.OMISSION_MARKER.format(dropped=cut.rows_dropped, total=cut.rows_total))
    assert marker in cut.text
    return kept, partial


def brace_balance(tex: str) -> int:
    return sum(1 if t == "{" else -1 for t in re.findall(r"\\.|[{}]", tex, re.S) if t in "{}")


def check_rows_whole(table: str, fmt: str, cut: T.TableCut, kept: int) -> None:
    """The cut fell between rows: the result parses as the format, with the kept rows intact."""
    marker = T.OMISSION_MARKER.format(dropped=cut.rows_dropped, total=cut.rows_total)
    if fmt == "csv":
        got = list(csv.reader(io.StringIO(cut.text, newline="")))
        assert got[:kept] == list(csv.reader(io.StringIO(table, newline="")))[:kept] and got[kept] == [marker]
    elif fmt == "json":
        items = json.loads(cut.text)
        assert items[:-1] == json.loads(table)[:kept] and items[-1] == marker
    elif fmt == "html":
        opened, closed = len(re.findall(r"<tr\b", cut.text, re.I)), len(re.findall(r"</tr\s*>", cut.text, re.I))
        assert opened - closed == len(re.findall(r"<tr\b", table, re.I)) - len(re.findall(r"</tr\s*>", table, re.I))
    elif fmt == "latex":
        assert brace_balance(cut.text) == brace_balance(table)
        assert cut.text.count(r"\begin{tabular}") - cut.text.count(r"\end{tabular}") == \
            table.count(r"\begin{tabular}") - table.count(r"\end{tabular}")
        assert marker + r" \\" in cut.text
    else:
        assert all(line.startswith("|") for line in cut.text.splitlines())


def _largest(data: Path, fmt: str) -> Path:
    return max(table_files(data, fmt), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("fmt,name,budget", [
    ("markdown", "society-table45", 100_000),  # 1,065,698 tokens in 32 lines: header does not fit whole
    ("html", None, 100_000),  # None: the largest file of the format
    ("csv", None, 100_000),
    ("latex", None, 5_000),
    ("json", None, 5_000),
])
def test_largest_tables(real_data, qwen_tokenizer, fmt, name, budget):
    path = real_data / fmt / f"{name}.{EXT[fmt]}" if name else _largest(real_data, fmt)
    table = read(path)
    cut = T.truncate_table(table, fmt, budget=budget, tokenizer=qwen_tokenizer)
    kept, partial = check(table, fmt, cut, budget, qwen_tokenizer)
    assert cut.tokens_original > 5 * budget, path.name
    assert cut.header_rows >= 1
    if not partial:
        assert kept >= cut.header_rows == T.split_rows(table, fmt).header_count
        check_rows_whole(table, fmt, cut, kept)
        # greedy: one more row would not fit (economy-table102_swap.csv: row 6 alone is 103,589 tokens)
        parts = T.split_rows(table, fmt)
        more = T.count_tokens(qwen_tokenizer, table[:parts.rows[kept][1]] + parts.trailer)
        assert more > budget - T.count_tokens(qwen_tokenizer, T.PARTIAL_MARKER) - 2 * T._SEAM
    if name == "society-table45":  # the header line and the |---| line, whole, then part of row 3
        assert partial and kept == 2 and cut.text.startswith(table[:table.index("\n", table.index("\n") + 1) + 1])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", T.FORMATS)
def test_sample_of_real_tables_at_a_third(real_data, qwen_tokenizer, fmt):
    """60 random files per format (seeded; files under 100 KB to keep the test fast) cut to 1/3."""
    files = [p for p in table_files(real_data, fmt) if p.stat().st_size < 100_000]
    whole = raised = 0
    for path in random.Random(f"truncation-{fmt}").sample(files, 60):
        table = read(path)
        n = T.count_tokens(qwen_tokenizer, table)
        budget = n // 3
        parts = T.split_rows(table, fmt)
        fixed = sum(T.count_tokens(qwen_tokenizer, t) for t in (parts.preamble, parts.trailer, T.PARTIAL_MARKER))
        if fixed > budget - 40:  # preamble + marker + trailer alone (nearly) exceed the budget: must raise
            raised += 1
            if raised <= 3:  # (checking every one would re-tokenize dozens of html files for nothing new)
                with pytest.raises(TruncationError, match="already exceed it"):
                    T.truncate_table(table, fmt, budget=fixed - 40, tokenizer=qwen_tokenizer)
            budget = fixed + (n - fixed) // 3  # then a third of the rows, to exercise the row cut anyway
        cut = T.truncate_table(table, fmt, budget=budget, tokenizer=qwen_tokenizer)
        assert cut.tokens_original == n
        kept, partial = check(table, fmt, cut, budget, qwen_tokenizer)
        if not partial:
            check_rows_whole(table, fmt, cut, kept)
            whole += 1
    # html: Excel's CSS preamble is often over a third of a small file
    assert whole >= 30 and raised <= (50 if fmt == "html" else 3), (whole, raised)

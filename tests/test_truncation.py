"""Truncation on synthetic tables in all five formats, with a small BPE trained here (no shared files)."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from html.parser import HTMLParser

import pytest

from hitbench_utils import truncation as T
from hitbench_utils.errors import TruncationError
from hitbench_utils.tokenization import train_tiny_bpe

NESTED = r"\multicolumn{1}{l}{\begin{tabular}[c]{@{}l@{}}two\\ lines\end{tabular}}"


def make_table(fmt: str, n: int = 60, seed: int = 0, nl: str = "\n") -> str:
    """A table with a 3-row hierarchical header and ``n`` body rows, with the quirks of the real data."""
    rnd = random.Random(seed)
    head = [["Survey 2024", "", ""], ["Region", "Income", "Income"], ["", "2019", "2020"]]
    body = [[f"Region {i} {rnd.choice(['North', 'South', 'East'])}", f"{rnd.randint(0, 99999):,}",
             f"{rnd.random() * 100:.2f}"] for i in range(n)]
    rows = head + body
    if fmt == "html":
        trs = "".join(" <tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>\n" for r in rows)
        return f"<html><head><style>td {{color: red}}</style></head><body>\n<table>\n{trs}</table>\n</body></html>\n"
    if fmt == "latex":
        lines = [" & ".join(r) + r" \\" for r in rows]
        for i in range(4, len(lines), 7):  # a cell with a nested tabular: its \\ is no row end
            lines[i] = NESTED + " & " + lines[i].split(" & ", 1)[1]
        lines[5] = r"\textbf{a \\ b} & 1 & 2 \\"  # \\ inside braces
        return nl.join([r"\begin{table}[]", r"\begin{tabular}{lrr}", *lines, r"\end{tabular}", r"\end{table}"])
    if fmt == "csv":
        for i in range(3, len(rows), 5):  # quoted cells spanning lines
            rows[i][0] = rows[i][0] + "\nsecond line, with comma"
        buf = io.StringIO(newline="")
        csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator=nl).writerows(rows)
        return buf.getvalue()
    if fmt == "markdown":
        fmt_row = lambda i, r: "| " + " | ".join([str(i)] + r) + " |"  # noqa: E731
        return "\n".join([fmt_row("", rows[0]), "|---:|:---|---:|---:|"] + [fmt_row(i, r) for i, r in enumerate(rows[1:])])
    if fmt == "json":
        return json.dumps([{"<return>": a, "Unnamed: 1": b, "Unnamed: 2": c} for a, b, c in rows], indent=2)
    raise ValueError(fmt)


@pytest.fixture(scope="module")
def tok():
    corpus = [make_table(f, 40, s) for f in T.FORMATS for s in range(3)]
    return train_tiny_bpe(corpus, vocab_size=1500)


def ends_of(table: str, fmt: str, **kw) -> list[int]:
    parts = T.split_rows(table, fmt, **kw)
    return [len(parts.preamble)] + [b for _, b in parts.rows]


def check_cut(table: str, fmt: str, cut: T.TableCut, budget: int, tok) -> int:
    """Shared invariants of a truncated result; returns the number of whole rows kept."""
    parts = T.split_rows(table, fmt)
    kept = cut.rows_total - cut.rows_dropped
    assert cut.truncated and cut.rows_dropped > 0
    assert cut.tokens_kept == T.count_tokens(tok, cut.text) <= budget
    assert cut.tokens_original == T.count_tokens(tok, table) > budget
    assert cut.rows_total == len(parts.rows)
    assert cut.text.startswith(table[:ends_of(table, fmt)[kept]])  # whole rows, verbatim, header first
    assert cut.text.endswith(parts.trailer)
    assert cut.header_rows == min(parts.header_count, kept)
    marker = T.OMISSION_MARKER.format(dropped=cut.rows_dropped, total=cut.rows_total)
    assert marker in cut.text
    return kept


@pytest.mark.parametrize("fmt", T.FORMATS)
def test_not_truncated_is_identical(fmt, tok):
    table = make_table(fmt)
    n = T.count_tokens(tok, table)
    assert n == len(tok(table, add_special_tokens=False)["input_ids"])
    for budget in (n, n + 100):
        cut = T.truncate_table(table, fmt, budget=budget, tokenizer=tok)
        assert cut.text is table or cut.text == table
        assert (cut.truncated, cut.rows_dropped, cut.tokens_original, cut.tokens_kept) == (False, 0, n, n)
        assert cut.rows_total == len(T.split_rows(table, fmt).rows)


@pytest.mark.parametrize("fmt", T.FORMATS)
@pytest.mark.parametrize("frac", [0.2, 0.5, 0.9])
def test_truncated_fits_keeps_header_and_marks(fmt, frac, tok):
    table = make_table(fmt, n=80)
    budget = int(T.count_tokens(tok, table) * frac)
    cut = T.truncate_table(table, fmt, budget=budget, tokenizer=tok)
    kept = check_cut(table, fmt, cut, budget, tok)
    assert cut.header_rows == T.split_rows(table, fmt).header_count >= 3
    # greedy: one more row would not have fit (the cut reserves the longest marker wording + seams)
    ends, trailer = ends_of(table, fmt), T.split_rows(table, fmt).trailer
    marker = T.OMISSION_MARKER.format(dropped=cut.rows_dropped - 1, total=cut.rows_total)
    reserve = T.count_tokens(tok, T.PARTIAL_MARKER.format(row=99, dropped=99, total=99)) + 2 * T._SEAM
    more = sum(T.count_tokens(tok, t) for t in (table[:ends[kept + 1]], marker, trailer))
    assert more > budget - reserve


def test_html_cut_is_whole_tr_elements(tok):
    table = make_table("html", 80)
    cut = T.truncate_table(table, "html", budget=T.count_tokens(tok, table) // 3, tokenizer=tok)
    kept = check_cut(table, "html", cut, T.count_tokens(tok, table) // 3, tok)

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.rows, self.colspans = [], 0, []

        def handle_starttag(self, tag, attrs):
            self.stack.append(tag)
            self.colspans += [v for k, v in attrs if k == "colspan"]

        def handle_endtag(self, tag):
            assert self.stack.pop() == tag
            self.rows += tag == "tr"

    p = Tags()
    p.feed(cut.text)
    assert p.stack == [] and p.rows == kept + 1  # complete elements, + the marker row
    assert p.colspans == ["3"]
    assert re.search(r'<tr><td colspan="3">\[\.\.\. [\d,]+ of [\d,]+ rows omitted', cut.text)


def test_csv_cut_reparses_to_original_records(tok):
    table = make_table("csv", 80)
    budget = T.count_tokens(tok, table) // 2
    cut = T.truncate_table(table, "csv", budget=budget, tokenizer=tok)
    kept = check_cut(table, "csv", cut, budget, tok)
    original = list(csv.reader(io.StringIO(table, newline="")))
    got = list(csv.reader(io.StringIO(cut.text, newline="")))
    assert got[:-1] == original[:kept]
    assert got[-1] == [T.OMISSION_MARKER.format(dropped=cut.rows_dropped, total=cut.rows_total)]
    assert any("\n" in c for r in got for c in r)  # multi-line cells survived whole


def test_csv_records_not_lines(tok):
    table = make_table("csv", 30)
    parts = T.split_rows(table, "csv")
    assert len(parts.rows) == len(list(csv.reader(io.StringIO(table, newline="")))) == 33
    assert len(parts.rows) < table.count("\n")
    crlf = make_table("csv", 30, nl="\r\n")
    cut = T.truncate_table(crlf, "csv", budget=T.count_tokens(tok, crlf) // 2, tokenizer=tok)
    assert cut.text.endswith('rows omitted to fit the token limit ...]"\r\n')


def test_json_cut_is_valid_json(tok):
    table = make_table("json", 80)
    budget = T.count_tokens(tok, table) // 3
    cut = T.truncate_table(table, "json", budget=budget, tokenizer=tok)
    kept = check_cut(table, "json", cut, budget, tok)
    items = json.loads(cut.text)
    assert items[:-1] == json.loads(table)[:kept]
    assert items[-1] == T.OMISSION_MARKER.format(dropped=cut.rows_dropped, total=cut.rows_total)


def _brace_balance(tex: str) -> int:
    return sum(1 if t == "{" else -1 for t in re.findall(r"\\.|[{}]", tex, re.S) if t in "{}")


@pytest.mark.parametrize("nl", ["\n", "\r\n"])
def test_latex_nested_tabular_and_braces(nl, tok):
    table = make_table("latex", 80, nl=nl)
    parts = T.split_rows(table, "latex")
    assert len(parts.rows) == 83  # the \\ in nested tabulars and in braces are not row ends
    assert parts.preamble == "\\begin{table}[]" + nl + "\\begin{tabular}{lrr}" + nl
    assert parts.trailer == "\\end{tabular}" + nl + "\\end{table}"
    budget = T.count_tokens(tok, table) // 3
    cut = T.truncate_table(table, "latex", budget=budget, tokenizer=tok)
    check_cut(table, "latex", cut, budget, tok)
    assert _brace_balance(cut.text) == 0
    assert cut.text.count(r"\begin{tabular}") == cut.text.count(r"\end{tabular}")
    assert re.search(r"\n\[\.\.\. [\d,]+ of 83 rows omitted to fit the token limit \.\.\.\] \\\\" + nl + r"\\end\{tabular\}",
                     cut.text)


def test_latex_last_row_without_row_end():
    table = "\\begin{tabular}{ll}\na & b \\\\\nc & d\n\\end{tabular}"
    parts = T.split_rows(table, "latex")
    assert [table[a:b] for a, b in parts.rows] == ["a & b \\\\\n", "c & d\n"]


def test_markdown_header_through_separator(tok):
    table = make_table("markdown", 80)
    assert T.split_rows(table, "markdown").header_count == 6  # header line + |---| + 4 data rows
    multi = "| a |\n| b |\n| c |\n|---|\n" + "\n".join(f"| {i} |" for i in range(20))
    assert T.split_rows(multi, "markdown", header_rows=2).header_count == 4  # all header lines, at least
    budget = T.count_tokens(tok, table) // 3
    cut = T.truncate_table(table, "markdown", budget=budget, tokenizer=tok)
    check_cut(table, "markdown", cut, budget, tok)
    assert all(line.startswith("|") for line in cut.text.split("\n"))
    assert cut.text.endswith(" rows omitted to fit the token limit ...] |")


def test_html_marked_header():
    thead = "<table><thead><tr><th>a</th></tr><tr><th>b</th></tr></thead><tbody>" + "<tr><td>1</td></tr>" * 9
    assert T.split_rows(thead + "</tbody></table>", "html").header_count == 2
    th = "<table>" + "<tr><th>a</th><th>b</th></tr>" + "<tr><td>1</td><td>2</td></tr>" * 9 + "</table>"
    assert T.split_rows(th, "html").header_count == 1
    plain = "<TABLE>" + "<TR><TD>1</TD></TR>\n" * 9 + "</TABLE>"
    parts = T.split_rows(plain, "html")
    assert (len(parts.rows), parts.header_count, parts.trailer) == (9, T.DEFAULT_HEADER_ROWS, "</TABLE>")


def test_html_nested_table_rows_stay_in_their_cell():
    inner = "<table><tr><td>x</td></tr><tr><td>y</td></tr></table>"
    table = f"<table>\n<tr><td>{inner}</td></tr>\n<tr><td>2</td></tr>\n</table>"
    parts = T.split_rows(table, "html")
    assert len(parts.rows) == 2 and inner in table[slice(*parts.rows[0])]


def _partial(cut: T.TableCut) -> bool:
    return "cut short;" in cut.text


def test_fewer_rows_than_header(tok):
    table = "| a | b |\n|---|---|\n| " + "word " * 400 + "| x |\n"
    budget = T.count_tokens(tok, table) // 2
    cut = T.truncate_table(table, "markdown", budget=budget, tokenizer=tok)
    assert cut.tokens_kept == T.count_tokens(tok, cut.text) <= budget
    assert cut.text.startswith("| a | b |\n|---|---|\n| word word")
    assert _partial(cut) and "[... row 3 cut short; 1 of 3 rows omitted or incomplete" in cut.text
    assert (cut.rows_total, cut.rows_dropped, cut.header_rows) == (3, 1, 2)


@pytest.mark.parametrize("fmt,table", [
    ("markdown", "| " + " | ".join(f"cell {i}" for i in range(800)) + " |"),
    ("json", json.dumps({f"key {i}": f"value {i}" for i in range(500)}, indent=2)),
    ("json", json.dumps([{f"key {i}": f"value {i}" for i in range(500)}], indent=2)),
    ("csv", ",".join(f'"cell {i}"' for i in range(800)) + "\n"),
    ("html", "<p>" + "no table here, only text. " * 300 + "</p>"),
])
def test_single_gigantic_unit_is_cut_inside(fmt, table, tok):
    for budget in (200, 600):
        cut = T.truncate_table(table, fmt, budget=budget, tokenizer=tok)
        assert cut.truncated and cut.tokens_kept == T.count_tokens(tok, cut.text) <= budget
        assert _partial(cut) and "of 1 rows omitted or incomplete" in cut.text
        common = os.path.commonprefix([cut.text, table])  # the kept text is the table's own prefix
        assert len(common) > 10 and len(cut.text) - len(common) < 150
        assert cut.rows_dropped == 1 and cut.header_rows == 0


@pytest.mark.parametrize("fmt", T.FORMATS)
def test_tiny_budget_raises_with_numbers(fmt, tok):
    table = make_table(fmt)
    with pytest.raises(TruncationError, match=r"cannot fit 5 tokens: preamble \d+ \+ marker \d+ \+ trailer \d+"):
        T.truncate_table(table, fmt, budget=5, tokenizer=tok)


def test_empty_table_unchanged(tok):
    for fmt in T.FORMATS:
        assert T.truncate_table("", fmt, budget=0, tokenizer=tok) == T.TableCut("", 0, 0, False, 0, 0, 0)


def test_unknown_format(tok):
    with pytest.raises(ValueError, match="fmt="):
        T.truncate_table("x", "xlsx", budget=10, tokenizer=tok)


def test_chunked_pass_matches_single_pass(tok, monkeypatch):
    table = "\n".join(make_table("markdown", 400, seed=s) for s in range(3))
    budget = T.count_tokens(tok, table) // 4
    single = T.truncate_table(table, "markdown", budget=budget, tokenizer=tok)
    monkeypatch.setattr(T, "_CHUNK_CHARS", 2_000)
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    offs = T._Offsets(tok, table)
    assert len(offs.chars) == 8 and offs.total == T.count_tokens(tok, table)
    enc = tok(table, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert [offs.start(i) for i in range(0, offs.total, 97)] == [enc[i][0] for i in range(0, offs.total, 97)]
    assert T.truncate_table(table, "markdown", budget=budget, tokenizer=tok) == single


def test_padding_left_on_by_a_batch_call_does_not_skew_counts(tok):
    table = make_table("csv", 200)
    clean = T.truncate_table(table, "csv", budget=T.count_tokens(tok, table) // 3, tokenizer=tok)
    tok(["a", table[:5000]], padding=True, truncation=True, max_length=64)  # leaves padding + truncation on
    assert T.truncate_table(table, "csv", budget=T.count_tokens(tok, table) // 3, tokenizer=tok) == clean


def test_marker_is_a_format_string():
    assert T.OMISSION_MARKER.format(dropped=812, total=1024) == "[... 812 of 1,024 rows omitted to fit the token limit ...]"


def test_a_table_is_tokenized_once_for_all_its_questions(monkeypatch, tok):
    """Questions on one table cut the same text with budgets a few tokens apart: one tokenization."""
    table = "| a | b |\n|---|---|\n" + "".join(f"| row {i} | {i * 7} |\n" for i in range(400))
    calls = []
    real = T._Offsets.__init__
    monkeypatch.setattr(T._Offsets, "__init__", lambda self, *a: (calls.append(1), real(self, *a))[1])
    T._RECENT.clear()
    cuts = [T.truncate_table(table, "markdown", budget=b, tokenizer=tok) for b in (900, 897, 903, 900)]
    assert len(calls) == 1
    T._RECENT.clear()
    fresh = [T.truncate_table(table, "markdown", budget=b, tokenizer=tok) for b in (900, 897, 903, 900)]
    assert cuts == fresh and all(c.truncated and c.tokens_kept <= b for c, b in zip(cuts, (900, 897, 903, 900)))

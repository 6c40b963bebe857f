"""Pure helpers of the chart metric (DESIGN.md §8.8): code extraction, line stripping, xlsx path
rewriting, y-value extraction from matplotlib axes, and the Pass rule.

They hold no state and import nothing heavy, so both sides use them: the client (``charts.py``)
extracts code and computes Pass, and the sandboxed child (``chart_server.py``) rewrites paths and
reads the axes. Keeping the rule in one place is what keeps the two sides from drifting apart.
"""
from __future__ import annotations

import ast
import math
import numbers
import re
from typing import Any

__all__ = [
    "CHART_TYPES", "extract_code", "strip_lines", "prepare_code", "rewrite_xlsx_paths",
    "chart_type_of", "extract_series", "to_value", "parse_reference", "chart_pass",
]

CHART_TYPES = ("LineChart", "BarChart", "ScatterChart", "PieChart")

_CODE_PATTERNS = (
    re.compile(r"import pandas as pd.*?plt\.show\(\)", re.S),
    re.compile(r"import matplotlib\.pyplot as plt.*?plt\.show\(\)", re.S),
)
# A quoted '*.xlsx' / "*.xlsx" path on one line, or the bare table.xlsx (the prompt's file name).
_XLSX = re.compile(r"'[^'\n]*\.xlsx'|\"[^\"\n]*\.xlsx\"|table\.xlsx")


def extract_code(text: str) -> str | None:
    """The last ``import pandas as pd … plt.show()`` span, else the last ``import matplotlib.pyplot
    as plt … plt.show()`` span, else None (then ECR and Pass are both False)."""
    if not text:
        return None
    for pattern in _CODE_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return matches[-1]
    return None


def strip_lines(code: str) -> str:
    """Strip surrounding spaces from every line, as the reference harness did (``line.strip(' ')``).

    This breaks programs with indented blocks, but the published numbers were made this way."""
    return "\n".join(line.strip(" ") for line in code.strip().split("\n")) + "\n"


def prepare_code(text: str) -> str | None:
    """Extraction then stripping: the program text, before its paths are pointed at the table."""
    code = extract_code(text)
    return None if code is None else strip_lines(code)


def rewrite_xlsx_paths(code: str, xlsx_path: str) -> str:
    """Point every quoted ``*.xlsx`` path, and the bare ``table.xlsx``, at ``xlsx_path``."""

    def repl(m: re.Match) -> str:
        s = m.group(0)
        return s[0] + xlsx_path + s[0] if s[0] in "'\"" else xlsx_path

    return _XLSX.sub(repl, code)


def chart_type_of(sub_qtype: str | None) -> str:
    """'LineChart Generation' -> 'LineChart' (the first word); '' for an empty sub-type."""
    words = (sub_qtype or "").split()
    return words[0] if words else ""


def to_value(v: Any) -> Any:
    """A y-value as the Pass rule sees it: numbers become Python floats (NaN kept), text stays text.

    numpy floats narrower than float64 go through their shortest repr, as the reference's
    print-then-literal_eval did (float32 0.1 counts as 0.1, not 0.10000000149). Masked values
    become NaN. Anything else (dates, None, objects) becomes its text, which never equals a number.
    """
    if isinstance(v, str):
        return str(v)
    if type(v).__name__ == "MaskedConstant":
        return math.nan
    dtype = getattr(v, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", "") in "biuf" and getattr(v, "ndim", 0) == 0:
        if dtype.kind == "f" and dtype.itemsize < 8:
            return float(str(v))
        return float(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return str(v)


def _values(seq: Any) -> list:
    try:
        return [to_value(v) for v in seq]
    except TypeError:  # a scalar where a sequence was expected
        return [to_value(seq)]


def extract_series(ax: Any, chart_type: str) -> list:
    """The y data of the current axes, per chart type (DESIGN.md §8.8.5)."""
    if chart_type == "LineChart":
        return [_values(line.get_ydata()) for line in ax.get_lines()]
    if chart_type == "BarChart":
        return [to_value(patch.get_height()) for patch in ax.patches]
    if chart_type == "ScatterChart":
        return [[to_value(off[1]) for off in coll.get_offsets()] for coll in ax.collections]
    if chart_type == "PieChart":
        return [round((float(p.theta2) - float(p.theta1)) / 360.0, 2) for p in ax.patches]
    raise ValueError(f"unsupported chart type {chart_type!r}; expected one of {CHART_TYPES}")


def parse_reference(reference: Any) -> list:
    """ProcessedAnswer as a Python literal (a list, possibly of lists). Raises ValueError when it is
    not one, e.g. the two references that contain the bare name ``masked`` (ids 566 and 591)."""
    if isinstance(reference, (list, tuple)):
        return list(reference)
    try:
        value = ast.literal_eval(str(reference).strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"reference is not a Python literal ({type(exc).__name__}): "
                         f"{str(reference)[:80]!r}") from None
    return value if isinstance(value, list) else [value]


def _flatten_one(values: list) -> list:
    out: list = []
    for v in values:
        out.extend(v) if isinstance(v, list) else out.append(v)
    return out


def _round2(v: Any) -> Any:
    v = to_value(v)
    return round(v, 2) if isinstance(v, float) else v


def _sort_key(v: Any) -> tuple:
    # Numbers first in numeric order (the reference's list.sort()), then NaN, then text: a total
    # order, so NaN == NaN can be compared position by position.
    if isinstance(v, float):
        return (1, 0.0, "") if math.isnan(v) else (0, v, "")
    return (2, 0.0, str(v))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def chart_pass(series: list, reference: Any, chart_type: str) -> tuple[bool, str | None]:
    """The Pass rule: flatten one level, round to 2 decimals, sort both, compare element by element
    (NaN equal to NaN; text never equals a number). For Pie the reference values first become shares
    of their total, rounded to 2. Returns (passed, why_not) where why_not explains a reference error."""
    try:
        ref = _flatten_one(parse_reference(reference))
    except ValueError as exc:
        return False, str(exc)
    if chart_type == "PieChart":
        nums = [to_value(v) for v in ref]
        if not all(isinstance(v, float) for v in nums):
            return False, "pie reference holds non-numeric values"
        total = sum(nums)
        if total == 0 or math.isnan(total):
            return False, "pie reference total is 0 or NaN"
        ref = [round(v / total, 2) for v in nums]
    ref_vals = sorted((_round2(v) for v in ref), key=_sort_key)
    pred_vals = sorted((_round2(v) for v in _flatten_one(list(series))), key=_sort_key)
    if len(ref_vals) != len(pred_vals):
        return False, None
    return all(_same(a, b) for a, b in zip(ref_vals, pred_vals)), None

"""Deterministic table renderer: an xlsx sheet (or a PhpSpreadsheet html table) → a PNG screenshot.

The shared RealHiTBench copy has no images, so the image and mix modalities need PNGs made here.
They must look like a spreadsheet screenshot (grid lines, merged multi-level headers drawn as one
cell, bold headers, values as Excel displays them) and be byte-identical on every machine, so
drawing uses only PIL and the DejaVu Sans fonts bundled with matplotlib, and the PNG carries no
timestamps or metadata.

Both sources become one grid model (``Grid`` of ``Cell`` with row, col, rowspan, colspan, text,
bold, align, fill), laid out by ``layout`` and drawn by ``draw``.

Size guard: a sheet larger than the image limits is cut, keeping the top-left part: at most
``MAX_SIDE`` (16,384) pixels per side and ``MAX_PIXELS`` (40 million, ~120 MB as RGB) in all.
Only the first ``MAX_READ_ROWS`` × ``MAX_READ_COLS`` cells are read, since no more could fit.
"""
from __future__ import annotations

import colorsys
import datetime as _dt
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .data import is_lfs_pointer
from .errors import MissingInputError

MAX_SIDE = 16_384
MAX_PIXELS = 40_000_000
FONT_PX, PAD_X, PAD_Y = 14, 6, 4
MIN_COL_W, MAX_AUTO_COL_W, MAX_LINES, MAX_TEXT = 40, 320, 20, 2_000
MAX_READ_ROWS, MAX_READ_COLS = MAX_SIDE // 20, MAX_SIDE // MIN_COL_W
GRID_RGB, TEXT_RGB = (160, 160, 160), (0, 0, 0)


@dataclass
class Cell:
    row: int
    col: int
    rowspan: int = 1
    colspan: int = 1
    text: str = ""
    bold: bool = False
    align: str = "left"  # left | center | right
    fill: tuple[int, int, int] | None = None


@dataclass
class Grid:
    n_rows: int
    n_cols: int
    cells: list[Cell]
    col_widths: dict[int, int] = field(default_factory=dict)  # pixel hints from the source


@dataclass
class Layout:
    col_x: list[int]  # n_cols + 1 boundaries, in pixels
    row_y: list[int]  # n_rows + 1 boundaries
    lines: list[list[str]]  # wrapped text per cell, parallel to Grid.cells
    cells: list[Cell]  # the cells that fit (spans clipped to the image)


# ---- values as Excel displays them -------------------------------------------------------------
def format_value(value: object, number_format: str | None = "General") -> str:
    """Excel-like display text for the common formats ('#,##0', '0.00', '0.0%', literals); else str."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, _dt.datetime):
        return value.strftime("%Y-%m-%d" if value.time() == _dt.time() else "%Y-%m-%d %H:%M:%S")
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if not isinstance(value, (int, float)) or isinstance(value, float) and not math.isfinite(value):
        return str(value)
    sections = (number_format or "General").split(";")
    code, v = sections[0], value
    if v < 0 and len(sections) > 1 and sections[1].strip():
        code, v = sections[1], -v  # the negative section carries its own sign/parentheses
    elif v == 0 and len(sections) > 2 and sections[2].strip():
        code = sections[2]
    code = re.sub(r"\[[^\]]*\]|_.|\*.", "", code)  # colours, locales, padding, fill
    m = re.search(r"[#0?][#0?,]*(\.[#0?]*)?", code)
    if code.strip().lower() in ("general", "@", ""):
        return _general(v)
    if m is None:  # a section of pure literal text, e.g. accounting zero '"-"'
        return _literal(code).strip() if '"' in code else _general(v)
    prefix, suffix = _literal(code[: m.start()]), _literal(code[m.end():])
    decimals = len(m.group(1) or ".") - 1
    if "%" in suffix:
        v = v * 100
    thousands = "," if "," in m.group(0).split(".")[0] else ""
    d = Decimal(repr(v) if isinstance(v, float) else v).quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_UP)
    return f"{prefix}{d:{thousands}.{decimals}f}{suffix}"  # Excel rounds halves away from zero


def _literal(s: str) -> str:
    return re.sub(r'"([^"]*)"|\\(.)', lambda g: g.group(1) or g.group(2) or "", s)


def _general(v: int | float) -> str:
    if isinstance(v, int) or float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.10g}".replace("e", "E")


# ---- sources → grid ----------------------------------------------------------------------------
def _check_input(path: Path) -> None:
    """Refuse missing files and Git LFS pointer stubs with a message that says how to fix it."""
    if not path.is_file():
        raise MissingInputError(f"{path}: file not found")
    if is_lfs_pointer(path):
        raise MissingInputError(f"{path} is a Git LFS pointer, not a table: fetch it with `git lfs pull`")


def _theme_colors(theme_xml: bytes | str | None) -> list[str]:
    """The workbook theme's colour scheme, in Excel's theme-index order (lt1, dk1, lt2, dk2, accents)."""
    if not theme_xml:
        return []
    text = theme_xml.decode("utf-8", "replace") if isinstance(theme_xml, bytes) else theme_xml
    scheme = re.search(r"<a:clrScheme.*?</a:clrScheme>", text, re.S)
    found = re.findall(r'<a:(?:srgbClr val|sysClr [^>]*?lastClr)="([0-9A-Fa-f]{6})"', scheme[0] if scheme else "")
    return found[1::-1] + found[3:1:-1] + found[4:] if len(found) >= 4 else found


def _rgb(color: object, theme: list[str]) -> tuple[int, int, int] | None:
    """A fill colour as RGB (rgb, indexed or theme+tint); None for white or unknown."""
    from openpyxl.styles.colors import COLOR_INDEX

    kind, hexrgb = getattr(color, "type", None), None
    if kind == "rgb":
        hexrgb = getattr(color, "rgb", None)
    elif kind == "indexed" and isinstance(color.indexed, int) and color.indexed < len(COLOR_INDEX):
        hexrgb = COLOR_INDEX[color.indexed]
    elif kind == "theme" and isinstance(color.theme, int) and color.theme < len(theme):
        hexrgb = theme[color.theme]
    if not isinstance(hexrgb, str) or not re.fullmatch(r"[0-9A-Fa-f]{6,8}", hexrgb):
        return None
    rgb = [int(hexrgb[-6:][i: i + 2], 16) / 255 for i in (0, 2, 4)]
    tint = float(getattr(color, "tint", 0.0) or 0.0)
    if tint:
        h, l, s = colorsys.rgb_to_hls(*rgb)
        rgb = list(colorsys.hls_to_rgb(h, l * (1 + tint) if tint < 0 else l * (1 - tint) + tint, s))
    out = tuple(round(v * 255) for v in rgb)
    return None if out == (255, 255, 255) else out


def grid_from_xlsx(xlsx_path: str | os.PathLike, *, max_cells: int | None = None) -> Grid:
    """Read the first sheet: values as displayed, merges, bold, alignment, solid fills, widths."""
    import openpyxl

    path = Path(xlsx_path)
    _check_input(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wb = openpyxl.load_workbook(path, data_only=True)
    except Exception as e:  # zip/XML errors of a corrupt or non-xlsx file: a missing input, not a crash
        raise MissingInputError(f"{path} is not a readable xlsx workbook: {type(e).__name__}: {e}") from e
    ws, theme = wb.worksheets[0], _theme_colors(wb.loaded_theme)
    n_cols = min(ws.max_column or 1, MAX_READ_COLS)
    n_rows = min(ws.max_row or 1, MAX_READ_ROWS)
    if max_cells is not None:
        n_rows = max(1, min(n_rows, max_cells // n_cols))
    anchors = {}
    for rng in ws.merged_cells.ranges:
        if rng.min_row <= n_rows and rng.min_col <= n_cols:
            anchors[(rng.min_row, rng.min_col)] = (min(rng.max_row, n_rows) - rng.min_row + 1,
                                                   min(rng.max_col, n_cols) - rng.min_col + 1)
    cells, last_r, last_c = [], 1, 1
    for row in ws.iter_rows(min_row=1, max_row=n_rows, max_col=n_cols):
        for c in row:
            if not hasattr(c, "column_letter"):  # MergedCell: covered by an anchor
                continue
            span = anchors.get((c.row, c.column), (1, 1))
            solid = getattr(c.fill, "fill_type", None) == "solid"
            fill = _rgb(c.fill.fgColor, theme) if solid else None
            if c.value is None and span == (1, 1) and fill is None:
                continue
            h = (c.alignment.horizontal or "general") if c.alignment is not None else "general"
            numeric = isinstance(c.value, (int, float)) and not isinstance(c.value, bool)
            align = {"center": "center", "centerContinuous": "center", "right": "right",
                     "left": "left"}.get(h, "right" if numeric else "left")
            cells.append(Cell(c.row - 1, c.column - 1, span[0], span[1],
                              format_value(c.value, c.number_format), bool(c.font and c.font.b), align, fill))
            last_r, last_c = max(last_r, c.row + span[0] - 1), max(last_c, c.column + span[1] - 1)
    widths: dict[int, int] = {}
    for dim in ws.column_dimensions.values():
        if dim.width and dim.min:
            for col in range(dim.min, min(dim.max or dim.min, n_cols) + 1):
                widths[col - 1] = max(MIN_COL_W, round(dim.width * 7 + 5))  # Excel chars → px
    return Grid(last_r, last_c, cells, {c: w for c, w in widths.items() if c < last_c})


class _HtmlTable(HTMLParser):
    """Collect the first <table>'s rows; bold/align/fill come from tags and td.styleN CSS rules."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[dict]] = []
        self.css, self._in_style, self._depth, self._tables, self._cell = "", False, 0, 0, None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "style":
            self._in_style = True
        elif tag == "table":
            self._depth += 1
            self._tables += self._depth == 1
        elif self._depth != 1 or self._tables != 1:
            return
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th") and self.rows:
            self._cell = {"a": a, "parts": [], "bold": tag == "th"}
            self.rows[-1].append(self._cell)
        elif tag == "br" and self._cell is not None:
            self._cell["parts"].append("\n")
        elif tag in ("b", "strong") and self._cell is not None:
            self._cell["bold"] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False
        elif tag == "table":
            self._depth -= 1
        elif tag in ("td", "th") and self._depth == 1:
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.css += data
        elif self._cell is not None:
            self._cell["parts"].append(re.sub(r"\s+", " ", data.replace("\xa0", " ")))


def _span(value: str) -> int:
    return max(1, int(value)) if value.strip().isdigit() else 1


def grid_from_html(html_path: str | os.PathLike) -> Grid:
    """Parse the first table of an html file, honouring rowspan/colspan (HTML table algorithm)."""
    path = Path(html_path)
    _check_input(path)
    p = _HtmlTable()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    rules = {m[1]: m[2] for m in re.finditer(r"td\.([\w-]+)\s*\{([^}]*)\}", p.css)}
    taken: set[tuple[int, int]] = set()
    cells: list[Cell] = []
    n_rows = min(len(p.rows), MAX_READ_ROWS)
    for r, row in enumerate(p.rows[:n_rows]):
        c = 0
        for h in row:
            while (r, c) in taken:
                c += 1
            rs = min(_span(h["a"].get("rowspan", "1")), n_rows - r)
            cs = min(_span(h["a"].get("colspan", "1")), MAX_READ_COLS)
            taken.update((r + i, c + j) for i in range(rs) for j in range(cs))
            classes = h["a"].get("class", "").split()
            css = " ".join(rules.get(k, "") for k in classes)
            align = "right" if "n" in classes else "left"
            if m := re.search(r"text-align:\s*(left|right|center)", css):
                align = m[1]
            fill = None
            if m := re.search(r"background-color:\s*#([0-9A-Fa-f]{6})", css):
                fill = tuple(int(m[1][i: i + 2], 16) for i in (0, 2, 4))
                fill = None if fill == (255, 255, 255) else fill
            text = "\n".join(s.strip() for s in "".join(h["parts"]).split("\n")).strip()
            bold = h["bold"] or "font-weight:bold" in css.replace(" ", "")
            cells.append(Cell(r, c, rs, cs, text, bold, align, fill))
            c += cs
    n_cols = min(max((c for _, c in taken), default=0) + 1, MAX_READ_COLS)
    cells = [c for c in cells if c.col < n_cols]
    for c in cells:
        c.colspan = min(c.colspan, n_cols - c.col)
    return Grid(max(n_rows, 1), n_cols, cells)


# ---- layout and drawing ------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _font(bold: bool) -> ImageFont.FreeTypeFont:
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), FONT_PX)


@lru_cache(maxsize=65_536)
def _width(text: str, bold: bool) -> int:
    return math.ceil(_font(bold).getlength(text)) if text else 0


def _wrap(text: str, bold: bool, width: int) -> list[str]:
    """Greedy word wrap; words wider than the cell are broken by characters."""
    out: list[str] = []
    for para in text[:MAX_TEXT].split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if _width(cand, bold) <= width or not line and len(word) <= 1:
                line = cand
                continue
            if line:
                out.append(line)
            line = ""
            for ch in word:  # break an over-long word
                if line and _width(line + ch, bold) > width:
                    out.append(line)
                    line = ""
                line += ch
        out.append(line)
    return out[:MAX_LINES - 1] + ["…"] if len(out) > MAX_LINES else out


def _complete(grid: Grid) -> list[Cell]:
    """Copies of the anchors (spans clipped to the grid) plus an empty 1×1 cell wherever no cell
    covers, so every position gets a box; overlapping cells are dropped."""
    cells, taken = [], set()
    for c in sorted(grid.cells, key=lambda c: (c.row, c.col)):
        if c.row >= grid.n_rows or c.col >= grid.n_cols or (c.row, c.col) in taken:
            continue
        c = replace(c, rowspan=min(c.rowspan, grid.n_rows - c.row), colspan=min(c.colspan, grid.n_cols - c.col))
        taken.update((c.row + i, c.col + j) for i in range(c.rowspan) for j in range(c.colspan))
        cells.append(c)
    cells += [Cell(r, c) for r in range(grid.n_rows) for c in range(grid.n_cols) if (r, c) not in taken]
    return sorted(cells, key=lambda c: (c.row, c.col))


def layout(grid: Grid) -> Layout:
    """Column widths (the sheet's, or the content's up to MAX_AUTO_COL_W, never narrower than an
    unbreakable value), wrapped lines, row heights that fit them; then the cut to the size limits."""
    cells = _complete(grid)
    line_h = sum(_font(False).getmetrics())
    content, solid = [0] * grid.n_cols, [0] * grid.n_cols
    for c in cells:
        if c.colspan == 1 and c.text:
            content[c.col] = max(content[c.col], *(_width(s, c.bold) for s in c.text.split("\n")))
            if " " not in c.text.strip() and "\n" not in c.text:
                solid[c.col] = max(solid[c.col], _width(c.text, c.bold))
    col_x = [0]
    for col in range(grid.n_cols):
        base = grid.col_widths.get(col) or min(content[col] + 2 * PAD_X, MAX_AUTO_COL_W)
        col_x.append(col_x[-1] + max(MIN_COL_W, base, min(solid[col] + 2 * PAD_X, MAX_AUTO_COL_W)))
    lines = [_wrap(c.text, c.bold, col_x[c.col + c.colspan] - col_x[c.col] - 2 * PAD_X) for c in cells]
    heights = [line_h + 2 * PAD_Y] * grid.n_rows
    for c, ls in zip(cells, lines):
        if c.rowspan == 1:
            heights[c.row] = max(heights[c.row], len(ls) * line_h + 2 * PAD_Y)
    for c, ls in sorted(zip(cells, lines), key=lambda t: t[0].row + t[0].rowspan):
        if c.rowspan > 1:  # a tall merged cell grows its last row
            short = len(ls) * line_h + 2 * PAD_Y - sum(heights[c.row: c.row + c.rowspan])
            heights[c.row + c.rowspan - 1] += max(0, short)
    row_y = [0]
    for h in heights:
        row_y.append(row_y[-1] + h)
    # the cut: keep the whole columns, then rows, that fit (always at least one of each)
    n_cols = max(1, sum(1 for x in col_x[1:] if x < MAX_SIDE))
    col_x = col_x[: n_cols + 1]
    n_rows = max(1, sum(1 for y in row_y[1:] if y < min(MAX_SIDE, MAX_PIXELS // (col_x[-1] + 1))))
    row_y = row_y[: n_rows + 1]
    kept = [(replace(c, rowspan=min(c.rowspan, n_rows - c.row), colspan=min(c.colspan, n_cols - c.col)), ls)
            for c, ls in zip(cells, lines) if c.row < n_rows and c.col < n_cols]
    return Layout(col_x, row_y, [ls for _, ls in kept], [c for c, _ in kept])


def draw(grid: Grid) -> Image.Image:
    """White background, fills, one outlined box per cell (merged cells have no inner lines), text."""
    lay = layout(grid)
    img = Image.new("RGB", (lay.col_x[-1] + 1, lay.row_y[-1] + 1), "white")
    d = ImageDraw.Draw(img)
    boxes = [(lay.col_x[c.col], lay.row_y[c.row], lay.col_x[c.col + c.colspan], lay.row_y[c.row + c.rowspan])
             for c in lay.cells]
    for c, box in zip(lay.cells, boxes):
        if c.fill:
            d.rectangle(box, fill=c.fill)
    for box in boxes:
        d.rectangle(box, outline=GRID_RGB)
    asc, desc = _font(False).getmetrics()
    for c, (x0, y0, x1, y1), ls in zip(lay.cells, boxes, lay.lines):
        font, y = _font(c.bold), y0 + (y1 - y0 - len(ls) * (asc + desc)) // 2
        for s in ls:
            w = _width(s, c.bold)
            x = {"left": x0 + PAD_X, "right": x1 - PAD_X - w}.get(c.align, x0 + (x1 - x0 - w) // 2)
            d.text((x, y), s, font=font, fill=TEXT_RGB)
            y += asc + desc
    return img


def _save(img: Image.Image, png_path: str | os.PathLike) -> tuple[int, int]:
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    img.save(png_path, format="PNG")  # PIL adds no time or text chunks unless asked
    return img.size


def render_xlsx(xlsx_path: str | os.PathLike, png_path: str | os.PathLike, *,
                max_cells: int | None = None) -> tuple[int, int]:
    """Render the first sheet of an xlsx as a spreadsheet-like PNG; returns (width, height) in px.
    ``max_cells`` reads only the first whole rows holding at most that many cells."""
    return _save(draw(grid_from_xlsx(xlsx_path, max_cells=max_cells)), png_path)


def render_html(html_path: str | os.PathLike, png_path: str | os.PathLike) -> tuple[int, int]:
    """Fallback when no xlsx is usable: render the html table (rowspan/colspan honoured)."""
    return _save(draw(grid_from_html(html_path)), png_path)

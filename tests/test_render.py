"""The deterministic table renderer: xlsx and html → spreadsheet-like PNG."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from openpyxl import Workbook
from openpyxl.styles import Alignment, Font
from PIL import Image

from hitbench_utils import render
from hitbench_utils.errors import MissingInputError

WHITE = (255, 255, 255)


def _make_xlsx(path: Path, n_rows: int = 4) -> Path:
    """Region (A1:A2) | 2023 (B1:C1) over Q1 Q2 | Total (D1:D2), bold headers, common number formats."""
    wb = Workbook()
    ws = wb.active
    ws.append(["Region", 2023, None, "Total (thousand USD, all quarters)"])
    ws.append([None, "Q1", "Q2", None])
    for i in range(n_rows):
        ws.append([f"Region {i}", 1234 + i, 0.125 + i / 100, 3.14159 * (i + 1)])
    for rng in ("A1:A2", "B1:C1", "D1:D2"):
        ws.merge_cells(rng)
    for row in ws.iter_rows(min_row=1, max_row=2):
        for c in row:
            c.font = Font(bold=True)
            c.alignment = Alignment(horizontal="center")
    for r in range(3, 3 + n_rows):
        ws.cell(r, 2).number_format = "#,##0"
        ws.cell(r, 3).number_format = "0.0%"
        ws.cell(r, 4).number_format = "0.00"
    wb.save(path)
    return path


HTML = """<html><head><style type="text/css">
      td.style1 { vertical-align:bottom; text-align:center; font-weight:bold; background-color:white }
      td.style2 { vertical-align:bottom; background-color:#FFF2CC }
</style></head><body>
<table border="0" cellpadding="0" cellspacing="0" id="sheet0" class="sheet0 gridlines">
  <tbody>
    <tr class="row0">
      <td class="column0 style1 s style1" rowspan="2">Employment status</td>
      <td class="column1 style1 s style1" colspan="2">Black or African<br />
American</td>
      <td class="column3 style1 s">Asian</td>
    </tr>
    <tr class="row1">
      <td class="column1 style0 n">2022</td>
      <td class="column2 style0 n">2023</td>
      <td class="column3">&nbsp;</td>
    </tr>
    <tr class="row2">
      <td class="column0 style2 s">Employed &amp; ratio</td>
      <td class="column1 style0 n">19937</td>
      <td class="column2 style0 n">20674</td>
      <td class="column3 style0 n">10615</td>
    </tr>
  </tbody>
</table></body></html>
"""


def _px(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return img.getpixel((x, y))


@pytest.mark.parametrize("value,fmt,shown", [
    (1234567, "#,##0", "1,234,567"), (0.125, "0.0%", "12.5%"), (3.14159, "0.00", "3.14"),
    (2022, "General", "2022"), (2022.0, "General", "2022"), (62.2, "General", "62.2"),
    (-40, "0.00_);[Red]\\(0.00\\)", "(40.00)"), (1500, '"$"#,##0.00', "$1,500.00"), ("text", "0.00", "text"),
    (None, "General", ""), (True, "General", "TRUE"), (1234.5, "#,##0", "1,235"), (2.675, "0.00", "2.68"),
    (0, '_-* #,##0_-;\\-* #,##0_-;_-* "-"_-;_-@_-', "-"), (-1234, '_-* #,##0_-;\\-* #,##0_-;_-* "-"_-;_-@_-', "-1,234"),
])
def test_format_value(value, fmt, shown):
    assert render.format_value(value, fmt) == shown


def test_xlsx_renders_deterministically_with_merged_headers(tmp_path: Path):
    xlsx = _make_xlsx(tmp_path / "t.xlsx")
    w, h = render.render_xlsx(xlsx, tmp_path / "a.png")
    assert render.render_xlsx(xlsx, tmp_path / "b.png") == (w, h)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert 200 <= w <= 1200 and 6 * 20 <= h <= 400
    grid = render.grid_from_xlsx(xlsx)
    texts = {(c.row, c.col): c for c in grid.cells}
    assert texts[(2, 1)].text == "1,234" and texts[(2, 2)].text == "12.5%" and texts[(2, 3)].text == "3.14"
    assert (texts[(0, 1)].rowspan, texts[(0, 1)].colspan) == (1, 2) and texts[(0, 1)].bold
    assert (texts[(0, 0)].rowspan, texts[(0, 0)].colspan) == (2, 1)


def test_merged_region_has_no_internal_grid_line(tmp_path: Path):
    xlsx = _make_xlsx(tmp_path / "t.xlsx")
    render.render_xlsx(xlsx, tmp_path / "t.png")
    img = Image.open(tmp_path / "t.png").convert("RGB")
    lay = render.layout(render.grid_from_xlsx(xlsx))
    x_bc, (y0, y1, y2) = lay.col_x[2], lay.row_y[:3]      # the B|C boundary; rows 1 and 2
    # B1:C1 is one cell: no vertical line at the B|C boundary near its top edge (off the text) ...
    assert all(_px(img, x_bc, y) == WHITE for y in range(y0 + 1, y0 + render.PAD_Y))
    # ... but row 2 (Q1 | Q2, not merged) has one there, in the grid colour.
    assert all(_px(img, x_bc, y) == render.GRID_RGB for y in range(y1 + 1, y2))
    # A1:A2 is one cell: no horizontal line between rows 1 and 2 inside column A; B1:C1 has its bottom border.
    assert all(_px(img, x, y1) == WHITE for x in range(lay.col_x[0] + 1, lay.col_x[0] + render.PAD_X))
    assert all(_px(img, x, y1) == render.GRID_RGB for x in range(lay.col_x[1] + 1, lay.col_x[3]))
    # the long header wraps instead of widening its column past the cap
    assert lay.col_x[4] - lay.col_x[3] <= render.MAX_AUTO_COL_W


def test_html_fallback_honours_rowspan_and_colspan(tmp_path: Path):
    src = tmp_path / "t.html"
    src.write_text(HTML, encoding="utf-8")
    grid = render.grid_from_html(src)
    assert (grid.n_rows, grid.n_cols) == (3, 4)
    cells = {(c.row, c.col): c for c in grid.cells}
    assert (cells[(0, 0)].rowspan, cells[(0, 1)].colspan) == (2, 2)
    assert cells[(0, 1)].text == "Black or African\nAmerican" and cells[(0, 1)].bold
    assert cells[(1, 1)].text == "2022" and cells[(1, 1)].align == "right"       # placed after the rowspan
    assert cells[(2, 0)].text == "Employed & ratio" and cells[(2, 0)].fill == (255, 242, 204)
    w, h = render.render_html(src, tmp_path / "a.png")
    render.render_html(src, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    img = Image.open(tmp_path / "a.png").convert("RGB")
    lay = render.layout(grid)
    assert img.size == (w, h) == (lay.col_x[-1] + 1, lay.row_y[-1] + 1)
    assert all(_px(img, x, lay.row_y[1]) == WHITE for x in range(2, render.PAD_X))   # inside the rowspan


def test_missing_and_lfs_pointer_inputs_are_refused(tmp_path: Path):
    stub = tmp_path / "t.xlsx"
    stub.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(MissingInputError, match="LFS"):
        render.render_xlsx(stub, tmp_path / "t.png")
    with pytest.raises(MissingInputError, match="not found"):
        render.render_html(tmp_path / "absent.html", tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_huge_sheets_are_cut_to_the_size_limits(tmp_path: Path, monkeypatch):
    xlsx = _make_xlsx(tmp_path / "t.xlsx", n_rows=60)
    full_w, full_h = render.render_xlsx(xlsx, tmp_path / "full.png")
    w, h = render.render_xlsx(xlsx, tmp_path / "capped.png", max_cells=4 * 10)   # 10 rows of 4 columns
    assert w <= full_w and h < full_h / 4
    monkeypatch.setattr(render, "MAX_SIDE", 300)
    w, h = render.render_xlsx(xlsx, tmp_path / "side.png")
    assert h <= 301 and w <= 301
    monkeypatch.setattr(render, "MAX_SIDE", 16_384)
    monkeypatch.setattr(render, "MAX_PIXELS", full_w * 200)
    w, h = render.render_xlsx(xlsx, tmp_path / "pixels.png")
    assert w == full_w and w * h <= full_w * 200 and h > 100


@pytest.mark.shared
def test_real_tables_render(real_data: Path, tmp_path: Path):
    """Three real xlsx tables and one real html table render to sensible, deterministic images."""
    for name in ("employment-table05", "economy-table69", "science-table16"):
        xlsx = real_data / "tables" / f"{name}.xlsx"
        if not xlsx.is_file():
            pytest.skip(f"{xlsx} absent from the shared copy")
        w, h = render.render_xlsx(xlsx, tmp_path / f"{name}.png")
        assert 300 <= w <= 5000 and 150 <= h <= 5000, (name, w, h)
        render.render_xlsx(xlsx, tmp_path / "again.png")
        assert (tmp_path / "again.png").read_bytes() == (tmp_path / f"{name}.png").read_bytes()
    grid = render.grid_from_xlsx(real_data / "tables" / "employment-table05.xlsx")
    cells = {(c.row, c.col): c for c in grid.cells}
    assert cells[(0, 1)].text == "Total" and cells[(0, 1)].colspan == 2 and cells[(0, 0)].rowspan == 2
    html = real_data / "html" / "employment-table05.html"
    hgrid = render.grid_from_html(html)
    assert (hgrid.n_rows, hgrid.n_cols) == (grid.n_rows, grid.n_cols)
    hcells = {(c.row, c.col): c.text for c in hgrid.cells}
    assert hcells[(0, 5)] == "Black or African\nAmerican" and hcells[(4, 1)] == cells[(4, 1)].text == "263973"
    w, h = render.render_html(html, tmp_path / "html.png")
    assert 300 <= w <= 5000 and 300 <= h <= 5000


@pytest.mark.shared
def test_real_lfs_stub_xlsx_is_refused(real_data: Path, tmp_path: Path):
    stub = real_data / "tables" / "society-table45.xlsx"
    if not stub.is_file() or stub.stat().st_size > 500:
        pytest.skip("society-table45.xlsx is not an LFS stub in this copy")
    shutil.copy(stub, tmp_path / "s.xlsx")
    with pytest.raises(MissingInputError):
        render.render_xlsx(tmp_path / "s.xlsx", tmp_path / "s.png")

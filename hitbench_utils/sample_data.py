"""An embedded synthetic RealHiTBench-shaped dataset, so tests, demos and smoke runs need no real data.

The real benchmark is CC-BY-NC and cannot ship with the project. This module invents 10 small
hierarchical tables (multi-level headers, merged cells, subtotals, section rows, a title row, a
footnote row, background colours) and 40 questions covering every QuestionType and SubQType, and
writes them in the exact RealHiTBench layout: ``QA_final.json``, ``html/ latex/ csv/ markdown/
json/ tables/ image/``. The text formats mimic the real files' producers (PhpSpreadsheet html,
tablesgenerator LaTeX with \\multicolumn/\\multirow, pandas csv/markdown/json with merged cells
unmerged), so a parser for the real files works on these.

Every reference answer is computed from the table data in code. Visualization references are
programs that read ``table.xlsx``; their ProcessedAnswer is the y-data the program draws (Pie: the
shares, rounded to 2 decimals). Unlike the real QA_final.json, Structure Comprehending questions
here carry answers, so every sample question can be scored.

Output is byte-for-byte deterministic for a given environment (fixed xlsx timestamps and zip
entry times; PNGs from :mod:`hitbench_utils.render`).
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import html
import io
import json
import os
import re
import shutil
import statistics as st
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from . import render

SOURCE = "hitbench synthetic sample"
FORMATS = {"html": "html", "latex": "txt", "csv": "csv", "markdown": "md", "json": "json"}
_MARKER = ".hitbench-sample.json"
_FIXED_TIME = _dt.datetime(2025, 1, 1, 0, 0, 0)
_ZIP_TIME = (2025, 1, 1, 0, 0, 0)
QUESTION_TYPES = {
    "Fact Checking": ["Value-Matching", "Multi-hop Fact Checking", "Inference-based Fact Checking"],
    "Numerical Reasoning": ["Calculation", "Comparison", "Counting", "Ranking", "Multi-hop Numerical Reasoning"],
    "Structure Comprehending": ["Structure Comprehending"],
    "Data Analysis": ["Summary Analysis", "Exploratory Analysis", "Rudimentary Analysis",
                      "Predictive Analysis", "Anomaly Analysis"],
    "Visualization": ["LineChart Generation", "BarChart Generation", "PieChart Generation",
                      "ScatterChart Generation"],
}
_TYPE_OF = {sub: qt for qt, subs in QUESTION_TYPES.items() for sub in subs}


# ---- the sheet model ---------------------------------------------------------------------------
@dataclass
class _Sheet:
    """One table: a value grid plus merges (r0, c0, r1, c1 inclusive, 0-based) and cell styles."""

    name: str
    category: str
    n_cols: int
    values: list[list[object]] = field(default_factory=list)
    merges: list[tuple[int, int, int, int]] = field(default_factory=list)
    bold: set[tuple[int, int]] = field(default_factory=set)
    center: set[tuple[int, int]] = field(default_factory=set)
    formats: dict[tuple[int, int], str] = field(default_factory=dict)
    fills: dict[tuple[int, int], str] = field(default_factory=dict)
    widths: list[float] | None = None
    questions: list[dict] = field(default_factory=list)

    def row(self, cells: list[object], *, bold: bool = False, fmt: dict[int, str] | None = None,
            fill: str | None = None) -> int:
        r = len(self.values)
        self.values.append(list(cells) + [None] * (self.n_cols - len(cells)))
        for c in range(self.n_cols):
            if bold:
                self.bold.add((r, c))
            if fill:
                self.fills[(r, c)] = fill
            if fmt and c in fmt and self.values[r][c] is not None:
                self.formats[(r, c)] = fmt[c]
        return r

    def merge(self, r0: int, c0: int, r1: int, c1: int, *, center: bool = True) -> None:
        self.merges.append((r0, c0, r1, c1))
        if center:
            self.center.add((r0, c0))

    def header(self, rows: list[list[object]], merges: list[tuple[int, int, int, int]],
               fill: str | None = None) -> None:
        """Bold, centred header rows (values in the merge anchors only, as Excel stores them)."""
        base = len(self.values)
        for cells in rows:
            r = self.row(cells, bold=True, fill=fill)
            self.center.update((r, c) for c in range(self.n_cols))
        for r0, c0, r1, c1 in merges:
            self.merge(base + r0, c0, base + r1, c1)

    def covered(self) -> set[tuple[int, int]]:
        return {(r, c) for r0, c0, r1, c1 in self.merges for r in range(r0, r1 + 1)
                for c in range(c0, c1 + 1) if (r, c) != (r0, c0)}

    def spans(self) -> dict[tuple[int, int], tuple[int, int]]:
        return {(r0, c0): (r1 - r0 + 1, c1 - c0 + 1) for r0, c0, r1, c1 in self.merges}

    def display(self, r: int, c: int) -> str:
        return render.format_value(self.values[r][c], self.formats.get((r, c), "General"))

    def ask(self, sub: str, question: str, answer: object, cot: list[str], processed: str | None = None) -> None:
        self.questions.append({"SubQType": sub, "Question": question, "FinalAnswer": str(answer),
                               "ProcessedAnswer": str(answer) if processed is None else processed,
                               "COT": [{"planning": s} for s in cot]})


# ---- answer helpers ----------------------------------------------------------------------------
def _corr(xs: list[float], ys: list[float]) -> str:
    r = st.correlation(xs, ys)
    strength = "Strong" if abs(r) >= 0.7 else "Moderate" if abs(r) >= 0.4 else "Weak"
    return f"{strength} {'positive' if r >= 0 else 'negative'} correlation, {r:.2f}"


def _predict(xs: list[float], ys: list[float], x: float) -> float:
    slope, intercept = st.linear_regression(xs, ys)
    return slope * x + intercept


def _argmax(d: dict[str, float]) -> str:
    best = max(d.values())
    keys = [k for k, v in d.items() if v == best]
    assert len(keys) == 1, f"tie in a reference answer: {keys}"
    return keys[0]


def _ydata(rows: list[list[float]] | list[float]) -> str:
    """ProcessedAnswer shape of the real set: a Python literal plus a newline."""
    return repr(rows) + "\n"


def _pie_shares(values: list[float]) -> list[float]:
    """Shares rounded to 2 decimals, checked stable under the scorer's re-normalisation (DESIGN §8)."""
    shares = [round(v / sum(values), 2) for v in values]
    assert [round(s / sum(shares), 2) for s in shares] == shares, shares
    return shares


_PROGRAM_HEAD = "import pandas as pd\nimport matplotlib.pyplot as plt\n"


# ---- the ten tables ----------------------------------------------------------------------------
def _sales() -> _Sheet:
    t = _Sheet("sales-sample01", "ColumnHeaderMerge", 10)
    qs = ["Q1", "Q2", "Q3", "Q4"]
    t.header([["Region", "Country", 2023, None, None, None, 2024], [None, None] + qs + qs],
             [(0, 0, 1, 0), (0, 1, 1, 1), (0, 2, 0, 5), (0, 6, 0, 9)])
    data = {
        "Europe": {"Germany": [412, 438, 455, 501, 468, 480, 497, 552],
                   "France": [305, 298, 321, 356, 318, 327, 340, 371],
                   "Italy": [214, 226, 219, 248, 221, 235, 242, 260]},
        "Asia": {"Japan": [389, 402, 395, 430, 401, 415, 409, 446],
                 "India": [178, 195, 213, 240, 236, 251, 270, 298],
                 "Vietnam": [96, 104, 117, 131, 128, 139, 150, 166]},
        "Americas": {"Brazil": [187, 176, 192, 205, 198, 190, 207, 221],
                     "Canada": [264, 271, 283, 297, 276, 289, 295, 312],
                     "Mexico": [143, 151, 149, 168, 160, 166, 171, 185]},
    }
    for region, countries in data.items():
        first = len(t.values)
        for i, (country, v) in enumerate(countries.items()):
            t.row([region if i == 0 else None, country] + v)
            t.bold.add((len(t.values) - 1, 0))
        t.merge(first, 0, len(t.values) - 1, 0)
    flat = {c: v for cs in data.values() for c, v in cs.items()}
    t.ask("Value-Matching", "What were India's sales in Q3 2024, in thousand USD?", flat["India"][6],
          ["Find the row for India under the Asia region.", "Read the Q3 column under the 2024 header."])
    t.ask("Calculation", "What were the total 2023 sales of the Europe region, summed over all its countries "
          "and quarters (thousand USD)?", sum(sum(v[:4]) for v in data["Europe"].values()),
          ["Select the rows of the Europe region.", "Add the four 2023 quarters of every country."])
    asia = {c: sum(v[4:]) for c, v in data["Asia"].items()}
    t.ask("Ranking", "Rank the countries of the Asia region by their total 2024 sales, from highest to lowest.",
          ", ".join(sorted(asia, key=asia.get, reverse=True)),
          ["Sum the four 2024 quarters for each Asian country.", "Sort the countries by that total, descending."])
    totals = [sum(sum(v[4:]) for v in cs.values()) for cs in data.values()]
    t.ask("BarChart Generation", "Draw a bar chart of the total 2024 sales of each region.",
          _PROGRAM_HEAD + "df = pd.read_excel('table.xlsx', header=None, skiprows=2)\n"
          "df.columns = ['Region', 'Country', '2023 Q1', '2023 Q2', '2023 Q3', '2023 Q4', "
          "'2024 Q1', '2024 Q2', '2024 Q3', '2024 Q4']\n"
          "df['Region'] = df['Region'].ffill()\n"
          "df['Total 2024'] = df[['2024 Q1', '2024 Q2', '2024 Q3', '2024 Q4']].sum(axis=1)\n"
          "totals = df.groupby('Region', sort=False)['Total 2024'].sum()\n"
          "plt.figure(figsize=(8, 5))\n"
          "plt.bar(totals.index, totals.values, color='steelblue')\n"
          "plt.title('Total 2024 sales by region (thousand USD)')\n"
          "plt.xlabel('Region')\nplt.ylabel('Sales (thousand USD)')\nplt.tight_layout()\nplt.show()",
          ["Forward-fill the merged Region column.", "Sum the 2024 quarters per country, then per region.",
           "Draw one bar per region."], _ydata(totals))
    t.ask("Exploratory Analysis", "What is the correlation between the countries' Q1 2023 sales and their "
          "Q1 2024 sales? Give the correlation relation and the coefficient rounded to two decimals.",
          _corr([v[0] for v in flat.values()], [v[4] for v in flat.values()]),
          ["Collect Q1 2023 and Q1 2024 sales for all nine countries.",
           "Compute the Pearson correlation coefficient and classify its strength."])
    return t


def _employment() -> _Sheet:
    t = _Sheet("employment-sample02", "ContentCompound", 7)
    t.widths = [24, 12, 12, 12, 12, 12, 12]
    t.row(["Table 2. Employment status of the civilian population by age group, 2022 and 2023 "
           "(numbers in thousands)"], bold=True)
    t.merge(0, 0, 0, 6, center=False)
    t.header([["Age group", "Civilian labor force", None, "Employed", None, "Unemployment rate (%)"],
              [None, 2022, 2023, 2022, 2023, 2022, 2023]],
             [(0, 0, 1, 0), (0, 1, 0, 2), (0, 3, 0, 4), (0, 5, 0, 6)])
    lf = {"16 to 19 years": (6120, 6254), "20 to 24 years": (15230, 15410), "25 to 34 years": (36110, 36650),
          "35 to 44 years": (34020, 34580), "45 to 54 years": (31840, 31990), "55 to 64 years": (27050, 27320),
          "65 years and over": (11020, 11390)}
    emp = {"16 to 19 years": (5430, 5561), "20 to 24 years": (14320, 14512), "25 to 34 years": (34880, 35390),
           "35 to 44 years": (33090, 33620), "45 to 54 years": (31010, 31120), "55 to 64 years": (26330, 26560),
           "65 years and over": (10690, 11030)}
    lf["Total, 16 years and over"] = tuple(sum(v[i] for v in lf.values()) for i in (0, 1))
    emp["Total, 16 years and over"] = tuple(sum(v[i] for v in emp.values()) for i in (0, 1))
    rate = {g: tuple(round(100 * (lf[g][i] - emp[g][i]) / lf[g][i], 1) for i in (0, 1)) for g in lf}
    fmt = {1: "#,##0", 2: "#,##0", 3: "#,##0", 4: "#,##0", 5: "0.0", 6: "0.0"}
    for g in lf:
        t.row([g, *lf[g], *emp[g], *rate[g]], bold=g.startswith("Total"), fmt=fmt)
    groups = [g for g in lf if not g.startswith("Total")]
    t.ask("Inference-based Fact Checking", "Which age group had the highest unemployment rate in 2023?",
          _argmax({g: rate[g][1] for g in groups}),
          ["Read the 2023 column under 'Unemployment rate (%)'.", "Find the age group with the largest rate."])
    big = _argmax({g: lf[g][1] for g in groups})
    t.ask("Multi-hop Fact Checking", "Which age group had the largest civilian labor force in 2023, and how "
          "many people in that group were employed in 2023 (thousands)?", f"{big}, {emp[big][1]}",
          ["Find the age group with the largest 2023 civilian labor force (excluding the total).",
           "Read that group's 2023 value under 'Employed'."])
    t.ask("Comparison", "How many more people aged 25 to 34 years than aged 45 to 54 years were employed in 2022 "
          "(thousands)?", emp["25 to 34 years"][0] - emp["45 to 54 years"][0],
          ["Read the 2022 employed values of both age groups.", "Subtract the smaller from the larger."])
    r23 = [rate[g][1] for g in groups]
    t.ask("Rudimentary Analysis", "What are the mean and the standard deviation of the 2023 unemployment rate "
          "across the seven age groups (excluding the total row)? Round both to two decimals.",
          f"{st.mean(r23):.2f}, {st.stdev(r23):.2f}",
          ["Collect the 2023 unemployment rates of the seven age groups.",
           "Compute their mean and sample standard deviation."])
    t.ask("Structure Comprehending", "How many age groups are listed in the table, not counting the total row?",
          len(groups), ["Identify the row header column 'Age group'.", "Count its entries, leaving out the total."])
    return t


def _enrollment() -> _Sheet:
    t = _Sheet("enrollment-sample03", "MultiColumnClassified", 8)
    t.widths = [12, 9, 9, 9, 9, 9, 9, 10]
    t.header([["School year", "Primary", None, "Lower secondary", None, "Upper secondary", None, "Total"],
              [None, "Boys", "Girls", "Boys", "Girls", "Boys", "Girls"]],
             [(0, 0, 1, 0), (0, 1, 0, 2), (0, 3, 0, 4), (0, 5, 0, 6), (0, 7, 1, 7)])
    years = [f"{y}/{(y + 1) % 100:02d}" for y in range(2015, 2023)]
    cols = [[5210, 5265, 5302, 5349, 5388, 5297, 5341, 5402], [5034, 5090, 5141, 5176, 5230, 5152, 5198, 5260],
            [2480, 2512, 2540, 2571, 2603, 2588, 2615, 2650], [2391, 2430, 2468, 2507, 2545, 2539, 2572, 2611],
            [1602, 1618, 1640, 1655, 1671, 1620, 1660, 1694], [1588, 1611, 1637, 1664, 1690, 1658, 1702, 1740]]
    total = [sum(c[i] for c in cols) for i in range(len(years))]
    for i, y in enumerate(years):
        t.row([y] + [c[i] for c in cols] + [total[i]], fmt={7: "#,##0"})
        t.bold.add((len(t.values) - 1, 0))
    t.ask("LineChart Generation", "Draw a line chart of primary-school enrollment of boys and of girls over the "
          "school years.",
          _PROGRAM_HEAD + "df = pd.read_excel('table.xlsx', header=None, skiprows=2)\n"
          "df.columns = ['School year', 'Primary boys', 'Primary girls', 'Lower secondary boys', "
          "'Lower secondary girls', 'Upper secondary boys', 'Upper secondary girls', 'Total']\n"
          "plt.figure(figsize=(9, 5))\n"
          "plt.plot(df['School year'], df['Primary boys'], marker='o', label='Boys')\n"
          "plt.plot(df['School year'], df['Primary girls'], marker='s', label='Girls')\n"
          "plt.title('Primary enrollment by sex')\nplt.xlabel('School year')\nplt.ylabel('Pupils')\n"
          "plt.legend()\nplt.grid(True)\nplt.show()",
          ["Skip the two header rows and name the columns.", "Plot the two primary columns against the year."],
          _ydata([cols[0], cols[1]]))
    t.ask("Predictive Analysis", "Based on the linear trend of total enrollment from 2015/16 to 2022/23, what "
          "total enrollment is predicted for 2023/24? Round to the nearest whole number.",
          round(_predict(list(range(8)), total, 8)),
          ["Read the Total column for the eight school years.", "Fit a least-squares line over time.",
           "Evaluate the line at the next school year."])
    t.ask("Value-Matching", "How many girls were enrolled in upper secondary education in 2019/20?", cols[5][4],
          ["Find the 2019/20 row.", "Read the Girls column under 'Upper secondary'."])
    t.ask("Counting", "In how many school years did girls outnumber boys in upper secondary education?",
          sum(g > b for b, g in zip(cols[4], cols[5])),
          ["Compare the Boys and Girls columns under 'Upper secondary' for each year.",
           "Count the years where Girls is larger."])
    drops = [i for i in range(1, len(years)) if total[i] < total[i - 1]]
    desc = ", ".join(f"{years[i]}: total enrollment fell to {total[i]} from {total[i - 1]} in {years[i - 1]} "
                     f"({100 * (total[i] - total[i - 1]) / total[i - 1]:.2f}%), the only decline in the series"
                     for i in drops)
    t.ask("Anomaly Analysis", "Are there any anomalies in total enrollment over the school years? If so, which "
          "years and what are their characteristics?", f"{len(drops)} anomaly detected - {desc}",
          ["Compute the year-on-year change of total enrollment.", "Flag years that break the rising trend."])
    return t


def _budget() -> _Sheet:
    t = _Sheet("budget-sample04", "StructureCompound", 6)
    t.widths = [13, 14, 13, 13, 11, 11]
    t.header([["Category", "Line item", "2024 (USD)", None, None, "Variance %"],
              [None, None, "Budget", "Actual", "Variance"]],
             [(0, 0, 1, 0), (0, 1, 1, 1), (0, 2, 0, 4), (0, 5, 1, 5)])
    groups = {"Personnel": {"Salaries": (1250000, 1268400), "Benefits": (310000, 305250),
                            "Training": (45000, 38900)},
              "Operations": {"Rent": (180000, 180000), "Utilities": (62000, 67350), "Supplies": (38000, 35120),
                             "Travel": (27000, 31480)},
              "Capital": {"Equipment": (150000, 142700), "Software": (85000, 91300)}}
    fmt = {2: "#,##0", 3: "#,##0", 4: "#,##0", 5: "0.0%"}

    def line(cat: object, item: str | None, b: int, a: int, bold: bool = False) -> None:
        t.row([cat, item, b, a, a - b, (a - b) / b], bold=bold, fmt=fmt)

    sub = {}
    for cat, items in groups.items():
        first = len(t.values)
        for i, (item, (b, a)) in enumerate(items.items()):
            line(cat if i == 0 else None, item, b, a)
        sub[cat] = tuple(sum(v[i] for v in items.values()) for i in (0, 1))
        line(None, "Subtotal", *sub[cat], bold=True)
        t.merge(first, 0, len(t.values) - 1, 0)
        t.bold.add((first, 0))
    line("Grand total", None, sum(b for b, _ in sub.values()), sum(a for _, a in sub.values()), bold=True)
    t.merge(len(t.values) - 1, 0, len(t.values) - 1, 1, center=False)
    items = {k: v for g in groups.values() for k, v in g.items()}
    t.ask("Value-Matching", "What was the actual 2024 spending on Utilities, in USD?", items["Utilities"][1],
          ["Find the Utilities line under Operations.", "Read the Actual column."])
    over = _argmax({k: a - b for k, (b, a) in items.items()})
    b, a = items[over]
    t.ask("Multi-hop Numerical Reasoning", "Which line item has the largest overspend (actual minus budget) in "
          "absolute terms, and by what percentage did it exceed its budget? Give the percentage with two "
          "decimals.", f"{over}, {100 * (a - b) / b:.2f}%",
          ["Compute actual minus budget for every line item (not subtotals).",
           "Pick the largest, then divide its overspend by its budget."])
    gb, ga = sum(b for b, _ in sub.values()), sum(a for _, a in sub.values())
    t.ask("Summary Analysis", "Can you give a concise summary of the table, its structure and its main insights?",
          f"The table compares the 2024 budget with actual spending for {len(items)} line items grouped into "
          f"{len(groups)} categories ({', '.join(groups)}), each followed by a subtotal, and a grand total. "
          f"Actual spending was {ga:,} USD against a budget of {gb:,} USD, a variance of {ga - gb:+,} USD "
          f"({100 * (ga - gb) / gb:+.1f}%). The largest overspend was {over} ({a - b:+,} USD); "
          f"{_argmax({k: b - a for k, (b, a) in items.items()})} was the most under budget.",
          ["Identify the categories, line items and subtotal rows.", "Compare the grand totals.",
           "Point out the largest deviations."])
    t.ask("Structure Comprehending", "Which line items are grouped under the Operations category?",
          ", ".join(groups["Operations"]),
          ["Locate the merged Operations cell in the Category column.",
           "List the line items it spans, leaving out the subtotal."])
    return t


def _weather() -> _Sheet:
    t = _Sheet("weather-sample05", "SingleRowClassified", 5)
    t.header([["Month", "Northport", None, "Southvale"],
              [None, "Avg temp (°C)", "Rainfall (mm)", "Avg temp (°C)", "Rainfall (mm)"]],
             [(0, 0, 1, 0), (0, 1, 0, 2), (0, 3, 0, 4)])
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    nt = [2.1, 3.0, 6.2, 9.8, 13.9, 17.2, 19.6, 19.1, 15.8, 11.2, 6.4, 3.0]
    nr = [78, 61, 58, 49, 52, 60, 66, 71, 69, 85, 90, 88]
    s_t = [11.4, 12.0, 14.6, 17.1, 20.8, 24.9, 27.8, 27.5, 24.1, 19.9, 15.2, 12.1]
    s_r = [96, 84, 70, 52, 31, 12, 4, 7, 28, 65, 101, 110]
    for row in zip(months, nt, nr, s_t, s_r):
        t.row(list(row), fmt={1: "0.0", 3: "0.0"})
    t.ask("ScatterChart Generation", "Create a scatter plot of Southvale's monthly average temperature (x) "
          "against its monthly rainfall (y).",
          _PROGRAM_HEAD + "df = pd.read_excel('table.xlsx', header=None, skiprows=2)\n"
          "df.columns = ['Month', 'Northport temp', 'Northport rain', 'Southvale temp', 'Southvale rain']\n"
          "plt.figure(figsize=(8, 6))\n"
          "plt.scatter(df['Southvale temp'], df['Southvale rain'], color='darkorange')\n"
          "plt.title('Southvale: temperature vs rainfall')\nplt.xlabel('Average temperature (°C)')\n"
          "plt.ylabel('Rainfall (mm)')\nplt.grid(True)\nplt.show()",
          ["Skip the two header rows and name the columns.", "Scatter Southvale rainfall against temperature."],
          _ydata([s_r]))
    t.ask("Exploratory Analysis", "What is the correlation between Southvale's monthly average temperature and "
          "its monthly rainfall? Give the correlation relation and the coefficient rounded to two decimals.",
          _corr(s_t, s_r), ["Take the two Southvale columns.", "Compute the Pearson correlation coefficient."])
    t.ask("Counting", "In how many months was Northport's average temperature above 10 °C?",
          sum(x > 10 for x in nt), ["Read Northport's temperature column.", "Count the months above 10 °C."])
    t.ask("Inference-based Fact Checking", "In which month was the difference between Southvale's and "
          "Northport's average temperatures the largest?",
          _argmax({m: round(b - a, 1) for m, a, b in zip(months, nt, s_t)}),
          ["Subtract Northport's temperature from Southvale's for each month.", "Find the largest difference."])
    return t


def _hospital() -> _Sheet:
    t = _Sheet("hospital-sample06", "BackgroundColor", 6)
    t.widths = [18, 9, 9, 9, 9, 12]
    t.row(["Hospital admissions by department, 2023"], bold=True, fill="BDD7EE")
    t.merge(0, 0, 0, 5)
    t.header([["Department", "Admissions", None, None, None, "Average stay (days)"],
              [None, "Q1", "Q2", "Q3", "Q4"]], [(0, 0, 1, 0), (0, 1, 0, 4), (0, 5, 1, 5)], fill="DDEBF7")
    data = {"Cardiology": [812, 790, 765, 841, 5.2], "Emergency": [2150, 1984, 2033, 2298, 1.4],
            "General surgery": [1046, 1012, 998, 1075, 4.1], "Maternity": [688, 702, 731, 694, 2.6],
            "Neurology": [402, 389, 377, 415, 6.8], "Oncology": [575, 590, 602, 611, 6.1],
            "Orthopaedics": [760, 748, 735, 784, 4.7], "Paediatrics": [930, 845, 812, 1011, 2.3]}
    for dept, v in data.items():
        t.row([dept] + v, fmt={1: "#,##0", 2: "#,##0", 3: "#,##0", 4: "#,##0", 5: "0.0"},
              fill="FFF2CC" if dept == "Emergency" else None)
    t.ask("Value-Matching", "How many admissions did Oncology have in Q3?", data["Oncology"][2],
          ["Find the Oncology row.", "Read the Q3 column under Admissions."])
    longest = _argmax({d: v[4] for d, v in data.items()})
    t.ask("Multi-hop Fact Checking", "Which department had the longest average stay, and what were its total "
          "admissions over the four quarters?", f"{longest}, {sum(data[longest][:4])}",
          ["Find the department with the largest average stay.", "Add its four quarterly admissions."])
    a, b = data["Cardiology"][3], data["Orthopaedics"][3]
    t.ask("Comparison", "Which department had more admissions in Q4, Cardiology or Orthopaedics, and by how many?",
          f"{'Cardiology' if a > b else 'Orthopaedics'}, {abs(a - b)}",
          ["Read the Q4 admissions of both departments.", "Compare them and take the difference."])
    t.ask("Rudimentary Analysis", "What is the mean total annual admissions per department? Round to two decimals.",
          f"{st.mean(sum(v[:4]) for v in data.values()):.2f}",
          ["Add the four quarters for each department.", "Average the eight totals."])
    return t


def _energy() -> _Sheet:
    t = _Sheet("energy-sample07", "ColumnHeaderMerge", 8)
    t.widths = [8, 10, 10, 10, 10, 10, 10, 11]
    t.header([["Year", "Electricity generation (GWh)"], [None, "Renewable", None, None, "Non-renewable", None,
                                                         None, "Total"],
              [None, "Solar", "Wind", "Hydro", "Coal", "Gas", "Nuclear"]],
             [(0, 0, 2, 0), (0, 1, 0, 7), (1, 1, 1, 3), (1, 4, 1, 6), (1, 7, 2, 7)])
    years = list(range(2016, 2024))
    src = {"Solar": [1200, 1650, 2240, 2980, 3720, 4610, 5580, 6720],
           "Wind": [5400, 6100, 6950, 7800, 8900, 9650, 10700, 11900],
           "Hydro": [8100, 7900, 8250, 8020, 8400, 7800, 7650, 8050],
           "Coal": [21000, 19800, 18200, 16500, 13900, 14200, 12100, 10300],
           "Gas": [15200, 15800, 16400, 17100, 16800, 17300, 17900, 17600],
           "Nuclear": [9800, 9750, 9900, 9600, 9700, 9450, 9500, 9400]}
    for i, y in enumerate(years):
        vals = [v[i] for v in src.values()]
        t.row([y] + vals + [sum(vals)], fmt={c: "#,##0" for c in range(1, 8)})
    ren = ["Solar", "Wind", "Hydro"]
    t.ask("PieChart Generation", "Draw a pie chart of the shares of solar, wind and hydro in 2023 renewable "
          "electricity generation.",
          _PROGRAM_HEAD + "df = pd.read_excel('table.xlsx', header=None, skiprows=3)\n"
          "df.columns = ['Year', 'Solar', 'Wind', 'Hydro', 'Coal', 'Gas', 'Nuclear', 'Total']\n"
          "row = df[df['Year'] == 2023].iloc[0]\n"
          "sources = ['Solar', 'Wind', 'Hydro']\n"
          "values = row[sources].astype(float).tolist()\n"
          "plt.figure(figsize=(7, 7))\n"
          "plt.pie(values, labels=sources, autopct='%1.1f%%', startangle=90)\n"
          "plt.title('Renewable generation mix, 2023')\nplt.show()",
          ["Skip the three header rows and name the columns.", "Take the 2023 row's solar, wind and hydro values.",
           "Draw them as a pie."], _ydata(_pie_shares([src[s][-1] for s in ren])))
    t.ask("Calculation", "By what percentage did solar generation grow from 2016 to 2023? Give two decimals.",
          f"{100 * (src['Solar'][-1] - src['Solar'][0]) / src['Solar'][0]:.2f}",
          ["Read solar generation in 2016 and 2023.", "Compute (2023 - 2016) / 2016 × 100."])
    first = next(y for i, y in enumerate(years) if sum(src[s][i] for s in ren) > src["Coal"][i])
    t.ask("Inference-based Fact Checking", "In which year did total renewable generation (solar, wind and hydro) "
          "first exceed coal generation?", first,
          ["Add the three renewable columns for each year.", "Find the first year the sum is above coal."])
    t.ask("Structure Comprehending", "Which generation sources are grouped under the 'Non-renewable' header?",
          "Coal, Gas, Nuclear", ["Locate the 'Non-renewable' merged header.", "List the columns beneath it."])
    t.ask("Predictive Analysis", "Using a linear trend fitted to 2016–2023, what solar generation (GWh) is "
          "predicted for 2024? Round to two decimals.", f"{_predict(years, src['Solar'], 2024):.2f}",
          ["Take the solar column with its years.", "Fit a least-squares line.", "Evaluate it at 2024."])
    return t


def _survey() -> _Sheet:
    t = _Sheet("survey-sample08", "MultiColumnClassified", 10)
    t.widths = [13, 10, 8, 8, 8, 8, 8, 8, 8, 8]
    levels = ["Very satisfied", "Satisfied", "Neutral", "Dissatisfied"]
    t.header([["Product line", "Responses", levels[0], None, levels[1], None, levels[2], None, levels[3]],
              [None, None] + ["Count", "Share"] * 4],
             [(0, 0, 1, 0), (0, 1, 1, 1), (0, 2, 0, 3), (0, 4, 0, 5), (0, 6, 0, 7), (0, 8, 0, 9)])
    data = {"Laptops": [212, 298, 96, 54], "Phones": [341, 402, 118, 79], "Tablets": [98, 151, 63, 38],
            "Monitors": [176, 190, 52, 22], "Printers": [61, 132, 88, 95], "Headphones": [230, 214, 71, 45]}
    for p, counts in data.items():
        n = sum(counts)
        t.row([p, n] + [x for c in counts for x in (c, c / n)], fmt={c: "0.0%" for c in (3, 5, 7, 9)})
    t.ask("Value-Matching", "What share of Printers respondents were dissatisfied?",
          f"{100 * data['Printers'][3] / sum(data['Printers']):.1f}%",
          ["Find the Printers row.", "Read the Share column under Dissatisfied."])
    most = _argmax({p: sum(c) for p, c in data.items()})
    t.ask("Multi-hop Fact Checking", "Which product line received the most responses, and what share of its "
          "respondents were very satisfied?", f"{most}, {100 * data[most][0] / sum(data[most]):.1f}%",
          ["Find the largest value in the Responses column.", "Read that row's 'Very satisfied' share."])
    pos = {p: (c[0] + c[1]) / sum(c) for p, c in data.items()}
    best, worst = _argmax(pos), _argmax({p: -v for p, v in pos.items()})
    t.ask("Summary Analysis", "Can you give a concise summary of the table, its structure and its main insights?",
          f"The table reports a customer satisfaction survey for {len(data)} product lines with "
          f"{sum(map(sum, data.values())):,} responses in total. For each of four satisfaction levels "
          f"({', '.join(levels)}) it gives the count and the share of the line's responses. {best} has the "
          f"highest share of satisfied or very satisfied customers ({100 * pos[best]:.1f}%), while {worst} has "
          f"the lowest ({100 * pos[worst]:.1f}%) and the highest dissatisfaction.",
          ["Describe the two-level header: level, then count and share.",
           "Compare the satisfied shares across product lines."])
    return t


def _transport() -> _Sheet:
    t = _Sheet("transport-sample09", "ExternalSupply", 6)
    t.widths = [12, 8, 10, 10, 10, 10]
    t.header([["City", "Mode", "Ridership (million trips)"], [None, None, 2020, 2021, 2022, 2023]],
             [(0, 0, 1, 0), (0, 1, 1, 1), (0, 2, 0, 5)])
    data = {"Ashford": {"Bus": [48.2, 51.7, 56.3, 58.9], "Rail": [31.5, 35.8, 41.2, 44.0],
                        "Tram": [12.4, 13.9, 15.6, 16.8]},
            "Belmont": {"Bus": [22.8, 24.1, 25.9, 27.4], "Rail": [9.6, 10.4, 11.8, 12.5]},
            "Corbridge": {"Bus": [35.1, 37.6, 40.2, 41.7], "Rail": [18.3, 20.9, 23.4, 25.2],
                          "Tram": [7.2, 8.1, 9.0, 9.9]},
            "Dunmore": {"Bus": [15.9, 16.8, 17.5, 18.6], "Ferry": [0.4, 1.9, 2.6, 3.1]}}
    for city, modes in data.items():
        first = len(t.values)
        for i, (mode, v) in enumerate(modes.items()):
            t.row([city if i == 0 else None, mode] + v, fmt={c: "0.0" for c in range(2, 6)})
        t.merge(first, 0, len(t.values) - 1, 0)
        t.bold.add((first, 0))
    t.row(["Note: Dunmore's ferry service ran a reduced timetable in 2020. All figures are invented for the "
           "hitbench sample."])
    t.merge(len(t.values) - 1, 0, len(t.values) - 1, 5, center=False)
    t.ask("Value-Matching", "What was Corbridge's tram ridership in 2021, in million trips?",
          render.format_value(data["Corbridge"]["Tram"][1], "0.0"),
          ["Find the Tram row under Corbridge.", "Read the 2021 column."])
    growth = {f"{c}, {m}": v[3] / v[0] for c, ms in data.items() for m, v in ms.items()}
    t.ask("Inference-based Fact Checking", "Which city and mode had the largest percentage increase in ridership "
          "from 2020 to 2023?", _argmax(growth),
          ["Compute 2023 / 2020 ridership for every city and mode.", "Find the largest ratio."])
    t.ask("Structure Comprehending", "Which transport modes are listed under Corbridge?",
          ", ".join(data["Corbridge"]), ["Locate the merged Corbridge cell.", "List the modes in the rows it spans."])
    return t


def _agriculture() -> _Sheet:
    t = _Sheet("agriculture-sample10", "SingleRowClassified", 7)
    t.widths = [12, 9, 9, 9, 9, 9, 9]
    t.header([["Crop", "Area harvested (kha)", None, "Yield (t/ha)", None, "Production (kt)"],
              [None, 2022, 2023, 2022, 2023, 2022, 2023]],
             [(0, 0, 1, 0), (0, 1, 0, 2), (0, 3, 0, 4), (0, 5, 0, 6)])
    groups = {"Cereals": {"Wheat": (2310, 2265, 7.84, 8.12), "Maize": (1180, 1235, 9.65, 9.21),
                          "Rice": (420, 415, 6.92, 7.05), "Barley": (960, 1010, 6.10, 6.34)},
              "Oilseeds": {"Soybean": (350, 372, 2.95, 3.08), "Rapeseed": (780, 745, 3.52, 3.71),
                           "Sunflower": (410, 455, 2.28, 2.15)},
              "Pulses": {"Lentils": (95, 110, 1.62, 1.48), "Chickpeas": (70, 82, 1.85, 1.93),
                         "Peas": (160, 150, 3.05, 3.22)}}
    prod = {}
    for g, crops in groups.items():
        r = t.row([g], bold=True, fill="E2EFDA")
        t.merge(r, 0, r, 6, center=False)
        for crop, (a22, a23, y22, y23) in crops.items():
            prod[crop] = (round(a22 * y22), round(a23 * y23))
            t.row([crop, a22, a23, y22, y23, *prod[crop]], fmt={1: "#,##0", 2: "#,##0", 3: "0.00", 4: "0.00",
                                                                  5: "#,##0", 6: "#,##0"})
    t.ask("Calculation", "What was the total production of cereals in 2023, in kt?",
          sum(prod[c][1] for c in groups["Cereals"]),
          ["Find the crops listed under the Cereals section row.", "Add their 2023 production."])
    t.ask("Inference-based Fact Checking", "Which crops had a lower production in 2023 than in 2022?",
          ", ".join(c for c, (p22, p23) in prod.items() if p23 < p22),
          ["Compare the 2022 and 2023 production of every crop.", "List the crops whose production fell."])
    return t


_BUILDERS = (_sales, _employment, _enrollment, _budget, _weather, _hospital, _energy, _survey, _transport,
             _agriculture)
SAMPLE_TABLES: tuple[str, ...] = ("sales-sample01", "employment-sample02", "enrollment-sample03",
                                  "budget-sample04", "weather-sample05", "hospital-sample06", "energy-sample07",
                                  "survey-sample08", "transport-sample09", "agriculture-sample10")


def _sheets() -> list[_Sheet]:
    sheets = [b() for b in _BUILDERS]
    assert tuple(s.name for s in sheets) == SAMPLE_TABLES
    return sheets


def _swapped(t: _Sheet) -> _Sheet:
    """``t`` with rows and columns swapped: the ``<name>_swap`` table its Structure Comprehending questions are
    asked on, as in RealHiTBench (same cells, styles and merges, transposed)."""
    tr = lambda rc: (rc[1], rc[0])  # noqa: E731
    return _Sheet(t.name + "_swap", t.category, len(t.values),
                  [[row[c] for row in t.values] for c in range(t.n_cols)],
                  [(c0, r0, c1, r1) for r0, c0, r1, c1 in t.merges], {tr(x) for x in t.bold}, {tr(x) for x in t.center},
                  {tr(k): v for k, v in t.formats.items()}, {tr(k): v for k, v in t.fills.items()}, None, [])


def _with_swaps(sheets: list[_Sheet]) -> list[_Sheet]:
    """Every sheet, and the swapped copy of each one that has a Structure Comprehending question."""
    return sheets + [_swapped(t) for t in sheets if any(_TYPE_OF[q["SubQType"]] == "Structure Comprehending"
                                                        for q in t.questions)]


def _questions(sheets: list[_Sheet]) -> list[dict]:
    out = []
    for s in sheets:
        for q in s.questions:
            out.append({"id": len(out) + 1, "FileName": s.name, "CompStrucCata": s.category, "Source": SOURCE,
                        "Question": q["Question"], "QuestionType": _TYPE_OF[q["SubQType"]],
                        "SubQType": q["SubQType"], "COT": q["COT"], "FinalAnswer": q["FinalAnswer"],
                        "ProcessedAnswer": q["ProcessedAnswer"]})
    return out


def sample_questions() -> list[dict]:
    """The 40 sample questions, in the QA_final.json item shape (ids 1..40)."""
    return _questions(_sheets())


# ---- writers -----------------------------------------------------------------------------------
def _xlsx(t: _Sheet) -> bytes:
    """openpyxl workbook with real merged cells, bold headers and fills; fixed times for stable bytes."""
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    wb.properties.creator, wb.properties.title = "hitbench", t.name
    wb.properties.created = wb.properties.modified = _FIXED_TIME
    spans = t.spans()
    for r, row in enumerate(t.values):
        for c, v in enumerate(row):
            cell = ws.cell(r + 1, c + 1, v)
            if (r, c) in t.bold:
                cell.font = Font(bold=True)
            if (r, c) in t.formats:
                cell.number_format = t.formats[(r, c)]
            if (r, c) in t.fills:
                cell.fill = PatternFill("solid", fgColor=t.fills[(r, c)])
            if (r, c) in spans or (r, c) in t.center:
                cell.alignment = Alignment(horizontal="center" if (r, c) in t.center else None,
                                           vertical="center", wrap_text=True)
    for r0, c0, r1, c1 in t.merges:
        ws.merge_cells(start_row=r0 + 1, start_column=c0 + 1, end_row=r1 + 1, end_column=c1 + 1)
    for c, w in enumerate(t.widths or []):
        ws.column_dimensions[get_column_letter(c + 1)].width = w
    raw = io.BytesIO()
    wb.save(raw)  # save() stamps properties.modified with "now": fixed again below
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "docProps/core.xml":
                stamp = _FIXED_TIME.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
                data = re.sub(rb"(<dcterms:modified[^>]*>)[^<]*", lambda m: m.group(1) + stamp, data)
            zi = zipfile.ZipInfo(info.filename, date_time=_ZIP_TIME)
            zi.compress_type, zi.external_attr = zipfile.ZIP_DEFLATED, 0o600 << 16
            zout.writestr(zi, data)
    return out.getvalue()


def _csv(t: _Sheet) -> str:
    """Every row and column, displayed values, merged cells unmerged (value in the anchor), all quoted."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for r in range(len(t.values)):
        w.writerow([t.display(r, c) for c in range(t.n_cols)])
    return buf.getvalue()


def _markdown(t: _Sheet, xlsx: bytes) -> str:
    """pandas.read_excel + a tabulate pipe table, as the real files were made (formatted cells as shown)."""
    import pandas as pd
    from tabulate import tabulate

    df = pd.read_excel(io.BytesIO(xlsx))
    header = ["" if str(c).startswith("Unnamed:") else str(c) for c in df.columns]
    body = []
    for i, row in enumerate(df.itertuples(index=False)):
        cells = []
        for c, v in enumerate(row):
            fmt = t.formats.get((i + 1, c))
            cells.append(t.display(i + 1, c) if fmt else "" if pd.isna(v) else str(v))
        body.append([str(i)] + cells)
    return tabulate(body, headers=[""] + header, tablefmt="pipe", disable_numparse=True,
                    colalign=("right",) + ("left",) * len(header))


def _json(csv_text: str) -> str:
    """Records from the csv (first row as keys, 'Unnamed: i' for blanks), empty rows dropped."""
    import pandas as pd

    df = pd.read_csv(io.StringIO(csv_text), dtype=str).dropna(how="all")
    records = df.astype(object).where(df.notna(), None).to_dict(orient="records")
    return json.dumps(records, indent=2, ensure_ascii=False)


_HTML_TOP = """<!DOCTYPE html PUBLIC "-//W3C//DTD HTML 4.01//EN" "http://www.w3.org/TR/html4/strict.dtd">
<html>
  <head>
      <meta http-equiv="Content-Type" content="text/html; charset=utf-8">
      <meta name="generator" content="PhpSpreadsheet, https://github.com/PHPOffice/PhpSpreadsheet">
      <meta name="author" content="hitbench" />
    <style type="text/css">
      html { font-family:Calibri, Arial, Helvetica, sans-serif; font-size:11pt; background-color:white }
      table { border-collapse:collapse; page-break-after:always }
      .gridlines td { border:1px dotted black }
      .gridlines th { border:1px dotted black }
      .n { text-align:right }
      .s { text-align:left }
"""


def _html(t: _Sheet) -> str:
    """PhpSpreadsheet-shaped html: styleN classes, rowspan/colspan, covered cells omitted, <br /> breaks."""
    styles: dict[tuple, int] = {(False, False, None): 0}
    spans, covered = t.spans(), t.covered()
    body = []
    for r, row in enumerate(t.values):
        body.append(f'          <tr class="row{r}">')
        for c, v in enumerate(row):
            if (r, c) in covered:
                continue
            key = ((r, c) in t.bold, (r, c) in t.center, t.fills.get((r, c)))
            k = styles.setdefault(key, len(styles))
            span = spans.get((r, c))
            attrs = "" if span is None else "".join(
                f' {name}="{n}"' for name, n in (("rowspan", span[0]), ("colspan", span[1])) if n > 1)
            if v is None:
                cls = f"column{c} style{k} null" if k else f"column{c}"
                body.append(f'            <td class="{cls}"{attrs}>{"" if k else "&nbsp;"}</td>')
                continue
            kind = "n" if isinstance(v, (int, float)) else "s"
            cls = f"column{c} style{k} {kind}" + (f" style{k}" if span else "")
            text = html.escape(t.display(r, c), quote=False).replace("\n", "<br />\n")
            body.append(f'            <td class="{cls}"{attrs}>{text}</td>')
        body.append("          </tr>")
    css = []
    for (bold, center, fill), k in styles.items():
        rule = ("vertical-align:bottom; " + ("text-align:center; " if center else "")
                + "border-bottom:none #000000; border-top:none #000000; border-left:none #000000; "
                  "border-right:none #000000; " + ("font-weight:bold; " if bold else "")
                + f"color:#000000; font-family:'Calibri'; font-size:11pt; background-color:{'#' + fill if fill else 'white'}")
        css += [f"      td.style{k} {{ {rule} }}", f"      th.style{k} {{ {rule} }}"]
    widths = [round(((t.widths or [])[c] if c < len(t.widths or []) else 8.43) * 7 + 5) * 0.75
              for c in range(t.n_cols)]
    css += [f"      table.sheet0 col.col{c} {{ width:{w:g}pt }}" for c, w in enumerate(widths)]
    css.append("      table.sheet0 tr { height:15pt }")
    return (_HTML_TOP + "\n".join(css) + "\n    </style>\n  </head>\n\n  <body>\n"
            '    <table border="0" cellpadding="0" cellspacing="0" id="sheet0" class="sheet0 gridlines">\n'
            + "".join(f'        <col class="col{c}">\n' for c in range(t.n_cols)) + "        <tbody>\n"
            + "\n".join(body) + "\n        </tbody>\n    </table>\n  </body>\n</html>\n")


def _tex_escape(s: str) -> str:
    s = re.sub(r"([&%$#_{}])", r"\\\1", s.replace("\\", "\0"))
    return s.replace("\0", r"\textbackslash{}").replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}")


def _latex(t: _Sheet) -> str:
    """tablesgenerator-shaped LaTeX: padded columns, \\multicolumn / \\multirow, CRLF line ends."""
    spans = t.spans()
    owner = {(r, c): (r0, c0) for r0, c0, r1, c1 in t.merges for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)}
    rows: list[list[tuple[str, int]]] = []  # (text, columns spanned)
    for r in range(len(t.values)):
        out, c = [], 0
        while c < t.n_cols:
            r0, c0 = owner.get((r, c), (r, c))
            rs, cs = spans.get((r0, c0), (1, 1))
            text = ""
            if (r, c) == (r0, c0) and t.values[r][c] is not None:
                text = "\\\\ ".join(_tex_escape(x) for x in t.display(r, c).split("\n"))
                if "\n" in t.display(r, c):
                    text = f"\\begin{{tabular}}[c]{{@{{}}l@{{}}}}{text}\\end{{tabular}}"
                if (r, c) in t.bold:
                    text = f"\\textbf{{{text}}}"
                if (r, c) in t.fills:
                    text = f"\\cellcolor[HTML]{{{t.fills[(r, c)]}}}{text}"
                if rs > 1:
                    text = f"\\multirow{{{rs}}}{{*}}{{{text}}}"
            if cs > 1:
                text = f"\\multicolumn{{{cs}}}{{{'c' if (r0, c0) in t.center else 'l'}}}{{{text}}}"
            out.append((text, cs))
            c += cs
        rows.append(out)
    width = [0] * t.n_cols
    for out in rows:
        c = 0
        for text, cs in out:
            if cs == 1:
                width[c] = max(width[c], len(text))
            c += cs
    lines = []
    for i, out in enumerate(rows):
        parts, c = [], 0
        for text, cs in out:
            parts.append(text.ljust(sum(width[c: c + cs]) + 3 * (cs - 1)))
            c += cs
        lines.append(" & ".join(parts) + (" \\\\" if i < len(rows) - 1 else ""))
    head = ["% Please add the following required packages to your document preamble:"]
    head += ["% \\usepackage{multirow}"] if any(r1 > r0 for r0, _, r1, _ in t.merges) else []
    if t.fills:
        head += ["% \\usepackage[table,xcdraw]{xcolor}",
                 "% Beamer presentation requires \\usepackage{colortbl} instead of \\usepackage[table,xcdraw]{xcolor}"]
    body = head + ["\\begin{table}[]", f"\\begin{{tabular}}{{{'l' * t.n_cols}}}"] + lines
    return "\r\n".join(body + ["\\end{tabular}", "\\end{table}"])


_README = """# hitbench synthetic sample dataset

This folder is **synthetic**: {n_tables} small hierarchical tables and {n_questions} questions invented
and generated by hitbench (`hitbench_utils.sample_data`, content version `{version}`). It is not
RealHiTBench data, and none of it was copied from the benchmark; it only mimics its layout so that
the harness can be tested and demonstrated without the (CC-BY-NC) benchmark files.

Layout, as in RealHiTBench: `QA_final.json` (`{{"queries": [...]}}`), `html/`, `latex/` (.txt),
`csv/`, `markdown/` (.md), `json/`, `tables/` (.xlsx, what chart code reads) and `image/` (.png,
rendered by `hitbench_utils.render`). Reference answers are computed from the table data;
Structure Comprehending questions carry answers here (the real QA_final.json leaves them empty).
Regenerate with `hitbench_utils.sample_data.ensure_sample_dataset()`.
"""


def content_version() -> str:
    """Short hash of the generator and renderer sources: a changed generator writes a new folder."""
    h = hashlib.sha256()
    for mod in (__file__, render.__file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:10]


def default_dest() -> Path:
    root = os.environ.get("HITBENCH_CACHE") or Path.home() / ".cache" / "hitbench"
    return Path(root) / f"sample-{content_version()}"


def write_sample_dataset(folder: str | os.PathLike) -> list[str]:
    """Write every file of the sample into ``folder`` (no atomicity); returns the relative paths."""
    folder = Path(folder)
    sheets = _sheets()
    files: dict[str, str | bytes] = {}
    for t in _with_swaps(sheets):
        xlsx = _xlsx(t)
        csv_text = _csv(t)
        files.update({f"tables/{t.name}.xlsx": xlsx, f"csv/{t.name}.csv": csv_text,
                      f"html/{t.name}.html": _html(t), f"latex/{t.name}.txt": _latex(t),
                      f"markdown/{t.name}.md": _markdown(t, xlsx), f"json/{t.name}.json": _json(csv_text)})
    qs = _questions(sheets)
    files["QA_final.json"] = json.dumps({"queries": qs}, indent=4, ensure_ascii=False)
    files["README.md"] = _README.format(n_tables=len(sheets), n_questions=len(qs), version=content_version())
    for rel, data in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            with open(p, "w", encoding="utf-8", newline="") as f:
                f.write(data)
    for t in _with_swaps(sheets):
        rel = f"image/{t.name}.png"
        render.render_xlsx(folder / f"tables/{t.name}.xlsx", folder / rel)
        files[rel] = b""
    return sorted(files)


def _is_complete(folder: Path, version: str) -> bool:
    try:
        meta = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("version") == version and all((folder / f).is_file() for f in meta.get("files", ["?"]))


def ensure_sample_dataset(dest: str | os.PathLike | None = None) -> Path:
    """Write the sample dataset once and return its folder.

    Idempotent: a folder already complete for this content version is reused untouched. Atomic: the
    files are written into a temporary sibling folder which is then renamed into place, so readers
    never see a half-written dataset and concurrent callers are safe. An existing ``dest`` is only
    replaced if it is empty or an older sample (it holds our marker file); anything else is refused.
    """
    version = content_version()
    dest = Path(dest) if dest is not None else default_dest()
    if _is_complete(dest, version):
        return dest
    if dest.exists() and any(dest.iterdir()) and not (dest / _MARKER).exists():
        raise FileExistsError(f"{dest} exists and is not a hitbench sample dataset; pass another dest")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    old = None
    try:
        files = write_sample_dataset(tmp)
        (tmp / _MARKER).write_text(json.dumps({"version": version, "files": files}, indent=1), encoding="utf-8")
        if _is_complete(dest, version):  # another process finished first
            return dest
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{tmp.name[-8:]}")
            try:
                dest.rename(old)
            except OSError:  # someone else moved it meanwhile
                old = None
        try:
            tmp.rename(dest)
        except OSError:
            if not _is_complete(dest, version):  # lost a race to a writer of another version, or worse
                raise
    finally:
        for p in (tmp, old):
            if p is not None and p.exists():
                shutil.rmtree(p, ignore_errors=True)
    return dest

"""Scoring for hitbench: QA metrics, sandboxed chart execution, the LLM judge, and aggregates.

The definitions follow DESIGN.md §8 exactly (the paper's numbers must be reproduced to the
hundredth). Names are re-exported lazily (PEP 562), so ``import hitbench_utils.scoring`` imports no
metric library and starts no process; the chart server starts on the first chart scored.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "score_answer": "qa", "normalize_answer": "qa", "QA_METRICS": "qa",
    "score_chart": "charts", "library_versions": "charts", "sandbox_info": "charts",
    "xlsx_problem": "charts", "ChartRunner": "charts", "shutdown_runner": "charts",
    "chart_pass": "chart_code", "extract_code": "chart_code", "prepare_code": "chart_code",
    "Judge": "judge", "JudgeError": "judge", "parse_score": "judge",
    "aggregate": "aggregates", "paper_table": "aggregates",
    "score_record": "records", "rescore_records": "records", "xlsx_path_for": "records",
    "scoring_provenance": "records",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from hitbench_utils.scoring.aggregates import aggregate, paper_table
    from hitbench_utils.scoring.chart_code import chart_pass, extract_code, prepare_code
    from hitbench_utils.scoring.charts import (ChartRunner, library_versions, sandbox_info, score_chart,
                                               shutdown_runner, xlsx_problem)
    from hitbench_utils.scoring.judge import Judge, JudgeError, parse_score
    from hitbench_utils.scoring.qa import QA_METRICS, normalize_answer, score_answer
    from hitbench_utils.scoring.records import rescore_records, score_record, scoring_provenance, xlsx_path_for


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

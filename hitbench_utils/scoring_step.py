"""The run's score step: each final record scored in place, never raising (a scoring failure is data)."""
from __future__ import annotations

from typing import Any

from . import data as D
from .records import SampleRecord
from .runfolder import RunFolder


class Scorer:
    def __init__(self, cfg: Any, data_path: Any, folder: RunFolder, secrets: list[str] | None = None,
                 backend: Any = None) -> None:
        self.cfg, self.data_path, self.folder, self.secrets = cfg, data_path, folder, secrets or []
        self.backend = backend       # its tokenizer cuts the judge's table
        self._judge: Any = None

    def judge(self) -> Any:
        """The LLM judge for Summary/Anomaly Analysis, when one is configured (else they stay unscored)."""
        if not (self.cfg.judge_base_url and self.cfg.judge_model):
            return None
        if self._judge is None:
            from .scoring import Judge
            from .scoring.judge_table import JudgeTables

            tables = JudgeTables(self.data_path, self.cfg.fmt, self.cfg.judge_max_table_tokens, self.cfg.table_encoding,
                                 _fast_tokenizer(self.backend))
            self._judge = Judge(self.cfg.judge_base_url, self.cfg.judge_model, api_key_env=self.cfg.judge_api_key_env,
                                cache_path=str(self.folder.judge_cache), tables=tables)
        return self._judge

    def score(self, rec: dict) -> dict:
        from .scoring import score_record

        return score_record(rec, xlsx_path=str(D.xlsx_path(self.data_path, rec["file_name"])),
                            artifacts_dir=str(self.folder.charts), chart_timeout=self.cfg.chart_timeout,
                            judge=self.judge(), chart_compat=self.cfg.chart_compat,
                            chart_allow_unsealed=self.cfg.chart_allow_unsealed, secrets=self.secrets)

    def __call__(self, rec: SampleRecord) -> None:
        try:
            out = self.score(rec.to_dict())
            rec.scores, rec.score_status, rec.score_error = out["scores"], out["score_status"], out.get("score_error")
            rec.score_detail = out.get("score_detail")
        except Exception as e:  # noqa: BLE001 - the answer is never lost to a scoring failure
            rec.score_status, rec.score_error = "error", f"{type(e).__name__}: {e}"

    def provenance(self) -> dict:
        from .scoring import scoring_provenance

        return scoring_provenance(chart_compat=self.cfg.chart_compat, judge=self.judge())


def _fast_tokenizer(backend: Any) -> Any:
    """The model's tokenizer when it is a fast (Rust-backed) one: the judge's table is cut with it."""
    tok = getattr(backend, "tokenizer", None)
    bt = getattr(tok, "backend_tokenizer", None) or tok
    return tok if hasattr(bt, "encode_batch") else None

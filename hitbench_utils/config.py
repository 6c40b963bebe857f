"""Run parameters: validated once, split into what changes answers (the fingerprint) and what does not."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .data import FORMAT_EXT, FORMATS, MODALITIES, QUESTION_TYPES, check_choice, check_encoding, file_sha256, parse_ids
from .errors import ConfigError

DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class RunConfig:
    modality: str = "text"
    format: str = "html"
    model: str = "tiny"
    prompts: str | None = None
    data_path: str | None = None          # None: the embedded sample dataset
    qa_file: str = "QA_final.json"
    image_dir: str | None = None          # None: <data_path>/image
    min_pixels: int | None = None         # the image budget (None: the processor's 65,536 – 16,777,216)
    max_pixels: int | None = None
    run_dir: str | None = None            # None: runs/<model>_<modality>[_<format>][_<qa stem>]
    resume: bool = True
    overwrite: bool = False
    batch_size: int = 4                   # plain engine: prompts per batch (shared-prefix decode slots follow memory)
    token_budget: int | None = None
    num_processes: int = 1                # >1: that many data-parallel workers (one per GPU), see parallel.py
    share_prefix: bool = True             # reuse each table's prefix KV cache across its questions
    max_input_tokens: int = 100_000
    max_new_tokens: int | None = None     # None: 1024, or the tiny model's cap of 32
    temperature: float = 0.0
    top_p: float = 0.8
    top_k: int = 20
    seed: int = 0
    limit: int | None = None
    ids: Any = None
    question_type: Any = None
    max_attempts: int = 3
    max_reasks: int = 2
    max_time_per_sample: float | None = None   # seconds; a longer generation ends as a timeout record
    # The OOM ladder's floors: below 8K tokens a prompt no longer holds a useful share of a large table,
    # and under 256×256 pixels (64 image tokens) an image no longer shows one; past them: an oom record.
    oom_floor_tokens: int = 8192
    oom_floor_pixels: int = 256 * 256
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    device: str = "auto"
    prepare_workers: int | None = None    # forked CPU workers preparing prompts ahead of the GPU (None: auto)
    max_error_share: float = 0.05         # the notebook fails when permanent errors exceed this share
    score: bool = True
    chart_timeout: float = 20.0
    chart_compat: bool = False            # score charts with the original harness's exec scoping (for comparison)
    chart_allow_unsealed: bool = False    # run chart programs even where a sandbox layer is missing (weaker)
    judge_base_url: str | None = None     # an OpenAI-compatible server for Summary/Anomaly Analysis
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_max_table_tokens: int = 16_000  # the table in the judge's prompt is cut to this (its own budget)
    # Structure Comprehending: asked on <FileName>_swap ("swap") or, for ablations, the original table;
    # scored against the paired original's answer ("gold") or the model's own answer to it ("consistency").
    structure_tables: str = "swap"
    structure_reference: str = "gold"
    pair_qa_file: str | None = None       # where SC questions find their originals (None: QA_final.json beside)
    table_encoding: str = "utf-8"         # a table file that is not valid UTF-8 is decoded with this (opt-in)
    # model="openai:<name>": an OpenAI-compatible server (vLLM, SGLang, LMDeploy, transformers serve, an API)
    base_url: str | None = None           # e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"   # the NAME of the environment variable holding the key (unset: no key)
    concurrency: int = 8                  # requests in flight at once
    request_timeout: float = 600          # seconds per HTTP request
    max_retries: int = 5                  # on 429, 5xx, connection errors and timeouts, with backoff
    tokenizer: str | None = None          # for exact counts/truncation: a local tokenizer folder, or 'qwen2'
    extra: dict = field(default_factory=dict)

    def validate(self) -> "RunConfig":
        check_choice("modality", self.modality, MODALITIES)
        if self.modality != "image":
            check_choice("format", self.format, FORMATS)
        if self.base_url and "," in self.base_url and self.num_processes < 2:
            raise ConfigError("base_url", self.base_url, "one URL, or several (comma-separated) with num_processes ≥ 2",
                              "give each worker its server with num_processes, or put the servers behind one load balancer")
        for name in ("batch_size", "max_input_tokens", "max_attempts", "num_processes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(name, v, "an integer ≥ 1")
        if self.prepare_workers is not None and (not isinstance(self.prepare_workers, int) or self.prepare_workers < 0):
            raise ConfigError("prepare_workers", self.prepare_workers, "None (auto) or an integer ≥ 0 (0: in the run's process)")
        if not isinstance(self.max_error_share, (int, float)) or not 0 <= self.max_error_share <= 1:
            raise ConfigError("max_error_share", self.max_error_share, "a share between 0 and 1, e.g. 0.05")
        if not isinstance(self.max_reasks, int) or self.max_reasks < 0:
            raise ConfigError("max_reasks", self.max_reasks, "an integer ≥ 0")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ConfigError("max_new_tokens", self.max_new_tokens, "None or an integer ≥ 1")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1024):
                raise ConfigError(name, v, "None or an integer ≥ 1024 (pixels; one image token per 32×32)")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError("min_pixels", self.min_pixels, f"at most max_pixels ({self.max_pixels})")
        if self.temperature < 0:
            raise ConfigError("temperature", self.temperature, "0 (greedy) or a positive number")
        check_choice("structure_tables", self.structure_tables, ("swap", "original"))
        check_choice("structure_reference", self.structure_reference, ("gold", "consistency"))
        self.table_encoding = check_encoding(self.table_encoding)
        v = self.judge_max_table_tokens
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError("judge_max_table_tokens", v, "an integer ≥ 0 (0: no table in the judge's prompt)")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("attn_implementation", self.attn_implementation, ATTN)
        self.ids = parse_ids(self.ids)
        if isinstance(self.question_type, str) and self.question_type.startswith("["):
            self.question_type = json.loads(self.question_type)
        for t in ([self.question_type] if isinstance(self.question_type, str) else self.question_type or []):
            check_choice("question_type", t, QUESTION_TYPES)
        if self.overwrite and self.resume:
            raise ConfigError("overwrite", True, "only with resume=False", "pass -p resume False -p overwrite True")
        return self

    @property
    def fmt(self) -> str | None:
        """The text format, or None for the image modality (no table text is sent)."""
        return None if self.modality == "image" else self.format

    def data_label(self) -> str:
        """What the data is, for the run folder's name: ``sample``, or the dataset folder's name."""
        if self.data_path in (None, "", "sample"):
            return "sample"
        name = Path(str(self.data_path).rstrip("/")).resolve().name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "data"

    def default_run_dir(self, runs_root: str | os.PathLike | None = None, data_label: str | None = None) -> Path:
        """``runs/<model>_<modality>[_<format>][_<qa stem>]_<data>``: runs of other data never share a folder."""
        from .backends.registry import model_label

        root = Path(runs_root or os.environ.get("HITBENCH_RUNS") or "runs")
        name = f"{model_label(self.model)}_{self.modality}" + (f"_{self.format}" if self.fmt else "")
        stem = Path(self.qa_file).stem
        if stem != "QA_final":
            name += f"_{stem}"
        return root / f"{name}_{data_label or self.data_label()}"

    @classmethod
    def from_params(cls, namespace: Mapping[str, Any]) -> "RunConfig":
        """The config from the notebook's parameters cell (its globals): every field it names, so the
        parameters are written once, in that cell."""
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: namespace[k] for k in names if k in namespace})

    def to_dict(self) -> dict:
        return asdict(self)


def data_fingerprint(data_path: Path, qa_path: Path, fmt: str | None) -> dict:
    """Hash of the QA file, and (recorded, not compared on resume) of the table files' names and sizes:
    restoring a missing table, as a missing_input record advises, must not lock the run folder."""
    h = hashlib.sha256()
    if fmt:
        folder = data_path / fmt
        if folder.is_dir():
            for e in sorted(os.scandir(folder), key=lambda e: e.name):
                if e.name.endswith("." + FORMAT_EXT[fmt]):
                    h.update(f"{e.name}\0{e.stat().st_size}\n".encode())
    return {"qa_sha256": file_sha256(qa_path)[:16], "tables_sha256": h.hexdigest()[:16]}


def fingerprint(cfg: RunConfig, *, model_identity: dict, templates_sha: str, data: dict,
                max_new_tokens: int, dtype: str) -> dict:
    """What changes answers. Leaves out batch_size, limit, ids, run_dir, resume and the device. The SC table
    choice and a table encoding appear only when they differ from what runs before them did (original
    tables, UTF-8), so those run folders still resume with the settings they were made with."""
    extra = {k: v for k, v in (("structure_tables", cfg.structure_tables), ("table_encoding", cfg.table_encoding))
             if v not in ("original", "utf-8")}
    return {**extra,
        "model": model_identity, "modality": cfg.modality, "format": cfg.fmt, "qa_file": Path(cfg.qa_file).name,
        "data": {"qa_sha256": data["qa_sha256"]}, "prompts_sha256": templates_sha[:16], "max_input_tokens": cfg.max_input_tokens,
        "generation": {"max_new_tokens": max_new_tokens, "temperature": cfg.temperature,
                       "top_p": cfg.top_p if cfg.temperature > 0 else None,
                       "top_k": cfg.top_k if cfg.temperature > 0 else None, "seed": cfg.seed,
                       "max_reasks": cfg.max_reasks},
        "attn_implementation": cfg.attn_implementation, "dtype": dtype,
        "images": None if cfg.modality == "text" else {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels},
    }

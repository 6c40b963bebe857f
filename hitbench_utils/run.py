"""A run, as a list of named steps: open the run folder, plan the work, prepare, generate, score and
append (each sample the moment it is final), finish.

The notebook calls ``Job(config).execute()``. Every sample ends as a record in the log: failures are
data, never a crashed run. Work already done is skipped; errors are retried up to ``max_attempts``.
The single-process run and a data-parallel rank are the same path; only the plan differs (all runnable
ids, or the chunks this rank claims).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import data as D
from .backends.base import GenRequest, GenSettings
from .backends.registry import backend_identity, load_backend, make_engine
from .checks import check_before_model, check_fixed_part
from .config import RunConfig, data_fingerprint, fingerprint
from .pairing import StructureTracker, fill_structure, plan_structure
from .pipeline import generate
from .plan import plan
from .prepare import Preparer, default_workers, look_ahead, prepare_stream
from .prompts import load_templates
from .records import SCHEMA_VERSION
from .redact import redact, secret_values
from .runfolder import RunFolder
from .runlog import RunLock, RunLog, ensure_run_dir
from .scoring_step import Scorer
from .sink import Progress, Sink
from .status import summarize, write_results
from .textlog import attach_file_log, detach

log = logging.getLogger("hitbench")


@dataclass
class Job:
    config: RunConfig
    backend: Any = None                 # inject a backend (tests, fault wrappers); else built from config
    runs_root: str | None = None
    progress: bool = True
    request_hook: Callable[[GenRequest], GenRequest] | None = None   # benchmarks: e.g. scripted answer lengths
    engine: Any = field(default=None, init=False)     # the last run's engine (its stats)
    scorer: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        cfg = self.config.validate()
        data_label = cfg.data_label()
        if cfg.data_path in (None, "", "sample"):
            from .sample_data import ensure_sample_dataset

            cfg.data_path = str(ensure_sample_dataset())
        self.data_path = D.check_data_path(cfg.data_path)
        self.image_dir = Path(cfg.image_dir) if cfg.image_dir else self.data_path / "image"
        self.qa_path = D.resolve_qa_file(self.data_path, cfg.qa_file)
        self.queries = D.select(D.load_queries(self.qa_path), ids=cfg.ids, limit=cfg.limit,
                                question_type=cfg.question_type)
        self.templates = load_templates(cfg.prompts)
        self.structure = plan_structure(self.qa_path, tables=cfg.structure_tables, reference=cfg.structure_reference,
                                        pair_qa_file=cfg.pair_qa_file, data_path=self.data_path)
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else cfg.default_run_dir(self.runs_root, data_label)
        self.folder = RunFolder(self.run_dir)
        self.secrets = secret_values([cfg.api_key_env, cfg.judge_api_key_env])   # never stored, wherever echoed

    def header(self) -> dict:
        ident, default_new, dtype = backend_identity(self.backend, self.config)
        c = self.config
        self.settings = GenSettings(c.max_new_tokens or default_new, c.temperature, c.top_p, c.top_k, c.seed,
                                    c.max_time_per_sample)
        data = data_fingerprint(self.data_path, self.qa_path, c.fmt)
        fp = fingerprint(c, model_identity=ident, templates_sha=self.templates.sha256, data=data,
                         max_new_tokens=self.settings.max_new_tokens, dtype=dtype)
        from . import __version__

        return {"type": "header", "schema": SCHEMA_VERSION, "hitbench_version": __version__, "fingerprint": fp,
                "created": time.time(), "data_path": str(self.data_path), "image_dir": str(self.image_dir),
                "qa_path": str(self.qa_path), "data_files": data, "prompts": self.templates.source,
                "templates": self.templates.data, "config": {k: v for k, v in c.to_dict().items() if k != "ids"}}

    # ---- the steps ------------------------------------------------------------------------------
    def execute(self) -> dict:
        """Run what is left of the plan; with ``num_processes`` > 1, as that many data-parallel workers."""
        from .parallel import launch, rank_from_env

        ranked = rank_from_env()
        if ranked is None and self.config.num_processes > 1:
            return launch(self)
        rank = ranked[0] if ranked is not None and ranked[1] > 1 else None
        check_before_model(self)
        with self._open(rank) as runlog:
            groups = plan(self, runlog, rank)
            preparer = self._load()
            self._generate(runlog, preparer, groups)
            return self._finish(runlog, rank)

    @contextmanager
    def _open(self, rank: int | None) -> Iterator[RunLog]:
        """The run folder held for writing: its lock, the text log, and this rank's sample log."""
        self.t_start = time.time()
        header = self.header()
        ensure_run_dir(self.run_dir)
        single = rank is None
        self.claims = None
        with RunLock(self.run_dir, name=self.folder.lock_name(rank)):
            handler = attach_file_log(self.folder.text_log(rank), self.secrets)
            runlog = None
            try:
                runlog = RunLog.open(self.run_dir, header, resume=self.config.resume or not single,
                                     overwrite=self.config.overwrite and single, name=self.folder.log(rank).name)
                runlog.secrets = self.secrets
                for n, why in runlog.contents.bad_lines:
                    log.warning("samples.jsonl line %d skipped: %s (records after it are kept)", n, why)
                yield runlog
            finally:
                if runlog is not None:
                    runlog.close()
                if self.claims is not None:
                    self.claims.close()
                detach(handler)

    def preparer(self) -> Preparer:
        """The run's preparation (the model loaded first): benchmarks build their baselines' prompts with it."""
        if self.backend is None:
            log.info("loading model %s (attn=%s, dtype=%s)", self.config.model, self.config.attn_implementation,
                     self.config.dtype)
            self.backend = load_backend(self.config)
        return Preparer(self.config, self.backend, self.templates, self.data_path, self.image_dir, self.request_hook,
                        self.structure)

    def _load(self) -> Preparer:
        preparer = self.preparer()
        check_fixed_part(preparer, self.queries)
        return preparer

    def _workers(self) -> int:
        w = self.config.prepare_workers
        return default_workers(str(self.backend.device)) if w is None else w

    def _generate(self, runlog: RunLog, preparer: Preparer, planned: Iterator) -> None:
        cfg = self.config
        engine = self.engine = make_engine(self.backend, cfg)    # kept: its stats stay readable
        ahead = look_ahead(getattr(engine, "groups_per_pull", 1))   # prepared a few pulls ahead of the engine
        groups = prepare_stream(preparer, planned, self._workers(), ahead)
        self.scorer = Scorer(cfg, self.data_path, self.folder, self.secrets, self.backend) if cfg.score else None
        progress = Progress(self.total or 0, f"{cfg.modality}_{cfg.fmt or 'png'}", engine, bar=self.progress)
        sc = StructureTracker(runlog.contents.records, cfg.structure_reference, cfg.score)
        try:
            flow = generate(engine, self.settings, groups, preparer, Sink(runlog.append, self.scorer, progress, sc.observe))
            self.prepare_wait_s = flow.wait_s    # the engine's wait for prepared prompts (benchmarks report it)
            self.prepare_wait_first_s = flow.first_wait_s     # of which at the start
        finally:
            progress.close()

    def _finish(self, runlog: RunLog, rank: int | None) -> dict:
        if self.config.score:
            fill_structure(runlog, self.config.structure_reference)   # SC consistency, also on resume
        runlog.close()
        if rank is not None:
            with self.claims.exclusive():
                summary = self._write_results()
            log.info("rank %d: nothing left to claim; the run so far: %s", rank, summary["verdict"])
        else:
            summary = self._write_results()
            log.info("%s", summary["verdict"])
        return summary

    def _write_results(self) -> dict:
        summary = summarize(self.run_dir)
        scoring = self.scorer.provenance() if self.scorer is not None else None
        write_results(self.run_dir, config=self.config.to_dict(), summary=summary, seconds=time.time() - self.t_start,
                      backend_info=redact(getattr(self.backend, "info", None), self.secrets), scoring=scoring)
        return summary


def run(**params: Any) -> dict:
    """One call: ``run(modality='text', format='html', ...)`` → the status summary of the run folder."""
    progress = params.pop("progress", True)
    runs_root = params.pop("runs_root", None)
    backend = params.pop("backend", None)
    job = Job(RunConfig(**params), backend=backend, runs_root=runs_root, progress=progress)
    return job.execute()

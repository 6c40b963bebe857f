"""Orchestration: data → prompts → truncation → engine → run log (→ scoring).

The notebook calls ``Job(config)`` then ``job.execute()``. Every sample ends as a record in the log:
failures are data, never a crashed run. Work already done is skipped; errors are retried up to
``max_attempts``.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import data as D
from .backends.base import GenRequest, GenSettings
from .config import RunConfig, data_fingerprint, fingerprint
from .engine import Engine
from .images import fit_image, halve_pixels
from .errors import ConfigError, SampleTimeout, TruncationError, status_of
from .prompts import Prompt, build_prompt, extract_answer, load_templates, reask_text
from .records import SCHEMA_VERSION, SampleRecord
from .runlog import LOCK_NAME, LOG_NAME, RunLock, RunLog, attempts, ensure_run_dir, rank_log_name, runnable
from .status import summarize, write_plan
from .pairing import StructureTracker, fill_structure, plan_structure

log = logging.getLogger("hitbench")



def load_backend(cfg: RunConfig):
    """'tiny' builds (once) and loads the tiny model through the very same hf path as a real folder;
    'openai:<name>' is a model behind an OpenAI-compatible server at ``base_url``."""
    if cfg.model.startswith("openai:"):
        from .backends.openai import from_config

        return from_config(cfg)
    from .backends.hf import HFBackend

    path = cfg.model
    if cfg.model == "tiny":
        from .backends.tiny import tiny_model_dir

        path = str(tiny_model_dir())
    return HFBackend(path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, device=cfg.device)


def make_engine(backend: Any, cfg: RunConfig) -> Engine:
    """The shared-prefix engine for local HF models (share_prefix=True), else plain batching."""
    from .backends.hf import HFBackend

    if cfg.share_prefix and isinstance(backend, HFBackend):   # wrappers (fault injection) get plain batching
        from .prefix_engine import PrefixEngine

        return PrefixEngine(backend, cfg.batch_size, cfg.token_budget)
    if getattr(backend, "device", None) == "remote":   # a server: no padding; keep `concurrency` requests busy
        return Engine(backend, max(cfg.batch_size, 2 * backend.concurrency), cfg.token_budget or 2**62)
    return Engine(backend, cfg.batch_size, cfg.token_budget)


@dataclass
class Prepared:
    record: SampleRecord
    prompt: Prompt
    table: str = ""
    image: Any = None
    request: GenRequest | None = None
    limit: int | None = None            # the token limit after OOM degradation (None: max_input_tokens)


@dataclass
class Job:
    config: RunConfig
    backend: Any = None                 # inject a backend (tests, fault wrappers); else built from config
    runs_root: str | None = None
    progress: bool = True
    stats: dict = field(default_factory=dict)
    engine: Engine | None = field(default=None, init=False)     # the last run's engine (its stats)

    def __post_init__(self) -> None:
        cfg = self.config.validate()
        if cfg.data_path in (None, "", "sample"):
            from .sample_data import ensure_sample_dataset

            cfg.data_path = str(ensure_sample_dataset())
        self.data_path = Path(cfg.data_path)
        if not self.data_path.is_dir():
            raise ConfigError("data_path", cfg.data_path, "a RealHiTBench folder (with QA_final.json and html/, latex/ ...)",
                              "pass -p data_path $(../shared/bin/realhitbench), or leave it out for the sample")
        self.image_dir = Path(cfg.image_dir) if cfg.image_dir else self.data_path / "image"
        self.qa_path = D.resolve_qa_file(self.data_path, cfg.qa_file)
        self.queries = D.select(D.load_queries(self.qa_path), ids=cfg.ids, limit=cfg.limit,
                                question_type=cfg.question_type)
        self.templates = load_templates(cfg.prompts)
        self.structure = plan_structure(self.qa_path, tables=cfg.structure_tables, reference=cfg.structure_reference,
                                        pair_qa_file=cfg.pair_qa_file, data_path=self.data_path)
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else cfg.default_run_dir(self.runs_root)

    # ---- set-up ---------------------------------------------------------------------------------
    def _identity(self) -> tuple[dict, int, str]:
        from .backends.hf import model_identity

        if self.backend is not None:
            ident = getattr(self.backend, "identity", {"path": getattr(self.backend, "name", "custom")})
            dtype = getattr(self.backend, "info", {}).get("dtype", self.config.dtype)
            default_new = getattr(self.backend, "default_max_new_tokens", 1024)
        else:
            if self.config.model == "tiny":
                from .backends.tiny import TINY_MAX_NEW_TOKENS, tiny_model_dir

                ident, default_new = model_identity(tiny_model_dir()), TINY_MAX_NEW_TOKENS
            elif self.config.model.startswith("openai:"):
                from .backends.openai import openai_identity

                url = self.config.extra.get("base_url_fleet") or self.config.base_url
                ident = openai_identity(self.config.model, url, self.config.tokenizer)
                return ident, self.config.max_new_tokens or 1024, "server"
            else:
                ident, default_new = model_identity(self.config.model), 1024
            dtype = self.config.dtype
            if dtype == "auto":
                from .backends.hf import resolve_device

                dtype = "bfloat16" if resolve_device(self.config.device).startswith("cuda") else "float32"
        return ident, self.config.max_new_tokens or default_new, dtype

    def header(self) -> dict:
        ident, max_new, dtype = self._identity()
        self.settings = GenSettings(max_new, self.config.temperature, self.config.top_p, self.config.top_k, self.config.seed,
                                    self.config.max_time_per_sample)
        data = data_fingerprint(self.data_path, self.qa_path, self.config.fmt)
        fp = fingerprint(self.config, model_identity=ident, templates_sha=self.templates.sha256, data=data,
                         max_new_tokens=max_new, dtype=dtype)
        from . import __version__

        return {"type": "header", "schema": SCHEMA_VERSION, "hitbench_version": __version__, "fingerprint": fp,
                "created": time.time(), "data_path": str(self.data_path), "image_dir": str(self.image_dir),
                "qa_path": str(self.qa_path), "data_files": data, "prompts": self.templates.source, "templates": self.templates.data,
                "config": {k: v for k, v in self.config.to_dict().items() if k not in ("ids",)}}

    # ---- the run ----------------------------------------------------------------------------------
    def execute(self) -> dict:
        """Run what is left of the plan; with ``num_processes`` > 1, as that many data-parallel workers."""
        from .parallel import launch, rank_from_env

        ranked = rank_from_env()
        if ranked is None and self.config.num_processes > 1:
            return launch(self)
        if ranked is not None and ranked[1] > 1:
            return self._execute_rank(ranked[0])
        cfg = self.config
        with self._writing(LOCK_NAME, "run.log", LOG_NAME, cfg.resume, cfg.overwrite) as (runlog, t_start):
            write_plan(self.run_dir, [q.id for q in self.queries], cfg.max_attempts)
            todo_ids = runnable([q.id for q in self.queries], runlog.contents.records, cfg.max_attempts)
            done = len(self.queries) - len(todo_ids)
            log.info("run %s: %d queries, %d already done, %d to run", self.run_dir, len(self.queries), done, len(todo_ids))
            if todo_ids:
                self._run_ids(runlog, set(todo_ids))
            summary = self._finish(runlog, t_start)
            log.info("%s", summary["verdict"])
            return summary

    def _execute_rank(self, rank: int) -> dict:
        """One data-parallel worker: claim chunks until none is left, append to this rank's own log."""
        from .parallel import Claims, claim_order, ranked_world

        cfg = self.config
        ids, cost, groups = claim_order(self.queries, self.data_path, cfg.fmt, self.templates, cfg.max_input_tokens)
        with self._writing(f"{LOCK_NAME}.rank{rank}", f"run.rank{rank}.log", rank_log_name(rank)) as (runlog, t_start):
            claims = Claims(self.run_dir, rank)
            try:
                with claims.exclusive():
                    write_plan(self.run_dir, ids, cfg.max_attempts)
                self._run_chunks(runlog, claims.chunks(ids, self._chunk(), cfg.max_attempts, ranked_world(), cost, groups))
                with claims.exclusive():
                    summary = self._finish(runlog, t_start)
                log.info("rank %d: nothing left to claim; the run so far: %s", rank, summary["verdict"])
                return summary
            finally:
                claims.close()

    @contextmanager
    def _writing(self, lock: str, text_log: str, log_name: str, resume: bool = True, overwrite: bool = False
                 ) -> Iterator[tuple[RunLog, float]]:
        """The run folder held for writing: its lock, the text log, and the sample log ``log_name`` open
        (a single run's, or one rank's)."""
        t_start = time.time()
        header = self.header()
        ensure_run_dir(self.run_dir)
        with RunLock(self.run_dir, name=lock):
            handler = _attach_file_log(self.run_dir, text_log)
            try:
                runlog = RunLog.open(self.run_dir, header, resume=resume, overwrite=overwrite, name=log_name)
                for n, why in runlog.contents.bad_lines:
                    log.warning("samples.jsonl line %d skipped: %s (records after it are kept)", n, why)
                yield runlog, t_start
            finally:
                logging.getLogger("hitbench").removeHandler(handler)
                handler.close()

    def _finish(self, runlog: RunLog, t_start: float) -> dict:
        if self.config.score:
            fill_structure(runlog, self.config.structure_reference)   # SC consistency, also on resume
        runlog.close()
        summary = summarize(self.run_dir)
        self._write_results(summary, time.time() - t_start)
        return summary

    def _run_ids(self, runlog: RunLog, todo: set[int]) -> None:
        tries = attempts(runlog.contents.records)
        ids = [q.id for q in self.queries if q.id in todo]
        chunk = self._chunk()
        self._run_chunks(runlog, ((ids[i:i + chunk], tries) for i in range(0, len(ids), chunk)), len(ids))

    def _chunk(self) -> int:
        """Queries prepared and handed to the engine at once. Text prompts: many, so the decode slots stay
        full across tables; with images, fewer, to bound the memory they hold."""
        return 512 if self.config.modality == "text" else max(32, 8 * self.config.batch_size)

    def _run_chunks(self, runlog: RunLog, chunks: Any, total: int | None = None) -> None:
        """Prepare, generate, score and log each chunk of ids (with the attempts already made per id)."""
        from tqdm.auto import tqdm

        if self.backend is None:
            log.info("loading model %s (attn=%s, dtype=%s)", self.config.model, self.config.attn_implementation, self.config.dtype)
            self.backend = load_backend(self.config)
        engine = self.engine = make_engine(self.backend, self.config)    # kept: its stats stay readable
        by_id = {q.id: q for q in self.queries}
        bar = tqdm(total=total, desc=f"{self.config.modality}_{self.config.fmt or 'png'}", disable=not self.progress)
        prepared = ([self._prepare(by_id[i], tries.get(i, 0) + 1) for i in ids] for ids, tries in chunks)
        sc = StructureTracker(runlog.contents.records, self.config.structure_reference, self.config.score)
        for rec in self._generate(engine, prepared):       # chunks are claimed and prepared as the engine asks
            t0 = time.perf_counter()
            self._score(rec)
            rec.score_s = round(time.perf_counter() - t0, 6)
            for r in sc.observe(rec.to_dict()):            # SC: both references; originals fill waiting SC
                runlog.append(r)
            bar.update(1)
        bar.close()

    def _prepare(self, q: D.Query, attempt: int) -> Prepared:
        """Read inputs, build and truncate the prompt; a failure here is already the record."""
        rec = SampleRecord.start(q, attempt)
        self.structure.start(rec, q)                # SC: the _swap table, the pair, the gold reference
        t0 = time.perf_counter()
        p = Prepared(rec, build_prompt(self.templates, q, self.config.modality, self.config.fmt or "html", ""))
        try:
            if self.config.fmt:
                p.table = D.read_table(self.data_path, self.config.fmt, rec.table_file, self.config.table_encoding,
                                       rec.degraded)
            if self.config.modality in ("image", "mix"):
                original = D.load_image(self.image_dir, rec.table_file)
                p.image = fit_image(original, self.config.min_pixels, self.config.max_pixels)
                rec.image_size, rec.image_size_sent = list(original.size), list(p.image.size)
                rec.image_tokens = self.backend.image_tokens(p.image)
            p.request = GenRequest(q.id, self._fit(p), p.image, rec.input_tokens_sent, share_from=p.prompt.suffix)
        except Exception as e:  # noqa: BLE001
            rec.fail(e)
        rec.prepare_s = time.perf_counter() - t0
        return p

    def _fit(self, p: Prepared, limit: int | None = None) -> list[dict]:
        """Bring the whole prompt (+ the re-ask reminder) under the limit: cut the table text first; when
        even its header cannot fit (mix), halve the image's pixels and try again."""
        limit = limit or self.config.max_input_tokens
        while True:
            try:
                return self._fit_text(p, limit)
            except TruncationError:
                if p.image is None or p.image.width * p.image.height <= self.config.oom_floor_pixels:
                    raise
                self._halve_image(p, f"to fit max_input_tokens={limit}")

    def _halve_image(self, p: Prepared, why: str) -> None:
        """Half the image's pixels, recorded: the last rung of fitting the limit and of the OOM ladder."""
        w, h = p.image.size
        p.image = halve_pixels(p.image)
        p.record.image_size_sent, p.record.image_tokens = list(p.image.size), self.backend.image_tokens(p.image)
        p.record.degraded.append(f"image {w}x{h} -> {p.image.width}x{p.image.height} {why}")

    def _fit_text(self, p: Prepared, limit: int) -> list[dict]:
        from .truncation import truncate_table

        rec, be = p.record, self.backend
        base = be.count_tokens(p.prompt.messages(table=""), p.image)
        reserve = (be.count_tokens(p.prompt.messages(table="", reask=reask_text(self.templates)), p.image) - base
                   if self.config.max_reasks else 0)
        if not p.table:
            rec.input_tokens_original = rec.input_tokens_sent = base
            if base + reserve > limit:
                raise TruncationError(f"the prompt (image included) is {base + reserve:,} tokens, over "
                                      f"max_input_tokens={limit:,}; lower max_pixels or raise the limit")
            return p.prompt.messages()
        budget = limit - base - reserve
        if budget <= 0:
            raise TruncationError(f"instructions, question and image alone take {base + reserve:,} tokens, over "
                                  f"max_input_tokens={limit:,}; nothing is left for the table")
        for _ in range(4):  # BPE merges across the table's edges can add a token or two: re-cut tighter
            cut = truncate_table(p.table, self.config.fmt, budget=budget, tokenizer=be.tokenizer)
            msgs = p.prompt.messages(table=cut.text)
            sent = be.count_tokens(msgs, p.image)
            if sent + reserve <= limit:
                break
            budget -= sent + reserve - limit
        else:
            raise TruncationError(f"could not bring the prompt under max_input_tokens={limit:,} (last try {sent:,})")
        rec.input_tokens_original = sent if not cut.truncated else base + cut.tokens_original
        rec.input_tokens_sent, rec.truncated, rec.rows_dropped = sent, cut.truncated, cut.rows_dropped
        if cut.truncated:
            log.warning("TRUNCATED id=%s %s %s: %s -> %s tokens (max_input_tokens=%s), %s of %s rows dropped",
                        rec.id, self.config.fmt, rec.file_name, f"{rec.input_tokens_original:,}", f"{sent:,}",
                        f"{limit:,}", f"{cut.rows_dropped:,}", f"{cut.rows_total:,}")
        return msgs

    def _generate(self, engine: Engine, chunks: Iterable[list[Prepared]]) -> Iterator[SampleRecord]:
        """Generate, re-ask when the final-answer line is missing, and walk the OOM ladder per sample.
        Each record is yielded as soon as it is final, so a kill loses only the samples in flight. The
        chunks stream into the engine; OOM retries and re-asks run after them."""
        live: dict[int, Prepared] = {}
        ready: list[SampleRecord] = []          # failed before generation: final already

        def final(p: Prepared) -> SampleRecord:
            live.pop(p.record.id, None)
            p.record.latency_s = round(p.record.prepare_s + p.record.generate_s, 6)  # its own share
            return p.record

        def requests() -> Iterator[list[GenRequest]]:
            for prepared in chunks:
                for p in prepared:
                    if p.request is None:
                        ready.append(final(p))
                    else:
                        live[p.record.id] = p
                yield [p.request for p in prepared if p.request is not None]

        reask = reask_text(self.templates)
        pending: list[GenRequest] = []
        for round_ in range(self.config.max_reasks + 1):
            retry: list[GenRequest] = []
            results = engine.run_stream(requests(), self.settings) if round_ == 0 else engine.run(pending, self.settings)
            while results is not None:
                again: list[GenRequest] = []
                for req, res, steps in results:
                    yield from ready
                    ready.clear()
                    p = live[req.key]
                    rec, viz = p.record, p.record.question_type == "Visualization"
                    rec.degraded += [s for s in steps if s not in rec.degraded]
                    if isinstance(res, BaseException):
                        smaller = self._degrade(p, req, round_) if status_of(res) == "oom" else None
                        if smaller is not None:
                            again.append(smaller)
                            continue
                        if round_ and rec.response is not None:   # a failed re-ask keeps the first answer
                            rec.degraded.append(f"re-ask {round_} failed: {type(res).__name__}: {res}"[:300])
                        else:
                            rec.fail(res)
                            rec.tried = rec.degraded + [f"failed in round {round_}"]
                        yield final(p)
                        continue
                    rec.generate_s += res.seconds
                    rec.response, rec.output_tokens = res.text, res.output_tokens
                    if round_ == 0 and res.input_tokens is not None:
                        rec.input_tokens_server = res.input_tokens
                    if res.timed_out:
                        rec.fail(SampleTimeout(f"generation passed max_time_per_sample={self.config.max_time_per_sample}s "
                                               f"after {res.output_tokens} new tokens"))
                        rec.response = res.text       # keep the partial answer: nothing is lost
                        yield final(p)
                        continue
                    rec.status, rec.error, rec.traceback = "ok", None, None
                    rec.prediction, rec.answer_format_ok = extract_answer(res.text, viz)
                    rec.reasks = round_
                    if not rec.answer_format_ok and round_ < self.config.max_reasks:
                        retry.append(GenRequest(req.key, _with_reask(req.messages, reask), p.image, req.input_tokens,
                                                share_from=req.share_from))
                    else:
                        yield final(p)
                yield from ready
                ready.clear()
                results = engine.run(again, self.settings) if again else None
            if not retry:
                break
            pending = retry

    def _degrade(self, p: Prepared, req: GenRequest, round_: int) -> GenRequest | None:
        """The OOM ladder for one sample: halve its token budget down to ``oom_floor_tokens``, then (image,
        mix) halve the image's pixels down to ``oom_floor_pixels``; None when nothing is left to try."""
        rec = p.record
        sent = rec.input_tokens_sent or self.config.max_input_tokens
        try:
            floor_t, floor_px = self.config.oom_floor_tokens, self.config.oom_floor_pixels
            if p.table and sent > floor_t:
                limit = max(floor_t, sent // 2)
                p.limit = limit
                msgs = self._fit(p, limit=limit)
                rec.degraded.append(f"max_input_tokens {sent} -> {limit} after OOM")
            elif p.image is not None and p.image.width * p.image.height > floor_px:
                self._halve_image(p, "after OOM")
                msgs = self._fit(p, limit=p.limit)
            else:
                return None
        except Exception as e:  # noqa: BLE001 - a failed degradation is the end of the ladder
            rec.degraded.append(f"degradation failed: {type(e).__name__}: {e}")
            return None
        log.warning("OOM on id=%s: retrying with %s", rec.id, rec.degraded[-1])
        if round_:
            msgs = _with_reask(msgs, reask_text(self.templates))
        return GenRequest(req.key, msgs, p.image, rec.input_tokens_sent, share_from=req.share_from)

    def judge(self):
        """The LLM judge for Summary/Anomaly Analysis, when one is configured (else they stay unscored)."""
        if not (self.config.judge_base_url and self.config.judge_model):
            return None
        if not hasattr(self, "_judge"):
            from .scoring import Judge
            from .scoring.judge_table import JudgeTables

            self._judge = Judge(self.config.judge_base_url, self.config.judge_model,
                                api_key_env=self.config.judge_api_key_env,
                                cache_path=str(self.run_dir / "judge_cache.jsonl"),
                                tables=JudgeTables(self.data_path, self.config.fmt, self.config.judge_max_table_tokens,
                                                   self.config.table_encoding, _fast_tokenizer(self.backend)))
        return self._judge

    def _score(self, rec: SampleRecord) -> None:
        if not self.config.score:
            return
        try:
            from .scoring import score_record

            out = score_record(rec.to_dict(), xlsx_path=str(D.xlsx_path(self.data_path, rec.file_name)),
                               artifacts_dir=str(self.run_dir / "charts"), chart_timeout=self.config.chart_timeout,
                               judge=self.judge())
            rec.scores, rec.score_status, rec.score_error = out["scores"], out["score_status"], out.get("score_error")
            rec.score_detail = out.get("score_detail")
        except Exception as e:  # noqa: BLE001 - the answer is never lost to a scoring failure
            rec.score_status, rec.score_error = "error", f"{type(e).__name__}: {e}"

    def _write_results(self, summary: dict, seconds: float) -> None:
        from .status import write_results

        scoring = None
        if self.config.score:
            from .scoring import scoring_provenance

            scoring = scoring_provenance(chart_compat=False, judge=self.judge())
        write_results(self.run_dir, config=self.config.to_dict(), summary=summary, seconds=seconds,
                      backend_info=getattr(self.backend, "info", None), scoring=scoring)


def _fast_tokenizer(backend: Any) -> Any:
    """The model's tokenizer when it is a fast (Rust-backed) one: the judge's table is cut with it."""
    tok = getattr(backend, "tokenizer", None)
    bt = getattr(tok, "backend_tokenizer", None) or tok
    return tok if hasattr(bt, "encode_batch") else None


def _with_reask(messages: list[dict], reask: str) -> list[dict]:
    """The same (already truncated) prompt with the reminder appended to the user turn."""
    out = json.loads(json.dumps(messages))
    out[-1]["content"][-1]["text"] += reask
    return out


def _attach_file_log(run_dir: Path, name: str = "run.log") -> logging.Handler:
    h = logging.FileHandler(run_dir / name, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    lg = logging.getLogger("hitbench")
    lg.setLevel(logging.INFO)
    lg.propagate = False          # our own handlers print it; the root logger would print it twice
    lg.addHandler(h)
    if not any(isinstance(x, logging.StreamHandler) and not isinstance(x, logging.FileHandler) for x in lg.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        lg.addHandler(sh)
    return h


def run(**params: Any) -> dict:
    """One call: ``run(modality='text', format='html', ...)`` → the status summary of the run folder."""
    progress = params.pop("progress", True)
    runs_root = params.pop("runs_root", None)
    backend = params.pop("backend", None)
    job = Job(RunConfig(**params), backend=backend, runs_root=runs_root, progress=progress)
    return job.execute()

"""LLM judge for Summary Analysis and Anomaly Analysis (DESIGN.md §8.7).

These sub-types have no QA metrics: an OpenAI-compatible chat model grades the answer against the
reference and ends with ``[Score]: N/100``. Verdicts are cached on disk by (judge model, prompt
hash), so re-scoring a run never pays twice; failed calls are not cached, so they can be re-judged
later without re-running inference. Only the standard library is used (urllib).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["Judge", "JudgeError", "parse_score", "JUDGED_SUBTYPES"]

JUDGED_SUBTYPES = ("Summary Analysis", "Anomaly Analysis")

_SYSTEM = (
    "You grade answers to questions about data tables. You are strict, consistent and brief. "
    "Compare the candidate answer with the reference answer written by an expert."
)
_RUBRIC = {
    "Summary Analysis": "Does the candidate summarise the same key facts, figures and trends as the "
                        "reference, without inventing numbers or missing the main points?",
    "Anomaly Analysis": "Does the candidate identify the same anomalies (which rows/values and why) as "
                        "the reference, with no false alarms?",
}
_TEMPLATE = """Task type: {sub_qtype}

Question:
{question}
{table}
Reference answer:
{reference}

Candidate answer:
{prediction}

What to judge: {rubric}
Give 100 for an answer as good as the reference, 0 for a wrong or empty one, and a proportional
score in between. Explain your judgement in at most three sentences, then end with exactly one line:
[Score]: N/100"""

# "[Score]: 85/100", "Score: 85 / 100", "**[Score]:** 85", "[Score]** = 8.5/10"
_SCORE = re.compile(r"\[?\s*score\s*\]?\s*\**\s*[:：=]\s*\**\s*(\d{1,3}(?:\.\d+)?)(?:\s*/\s*(\d{1,3}))?",
                    re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge could not be reached or gave no usable score."""


def parse_score(text: str) -> float:
    """The last ``[Score]: N`` in ``text`` on a 0-100 scale; raises JudgeError when there is none."""
    matches = _SCORE.findall(text or "")
    if not matches:
        raise JudgeError(f"no [Score] line in the judge's reply: {(text or '')[-200:]!r}")
    value, denominator = matches[-1]
    score = float(value) * (100.0 / float(denominator) if denominator and float(denominator) > 0 else 1.0)
    if not 0.0 <= score <= 100.0:
        raise JudgeError(f"judge score out of range: {score}")
    return round(score, 2)


class Judge:
    """A judge model behind ``{base_url}/chat/completions``; the API key is read from the environment
    variable named ``api_key_env`` (not passed as a value, so it never lands in configs or logs)."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 cache_path: str | os.PathLike | None = None, timeout: float = 60.0, max_retries: int = 2,
                 max_tokens: int = 512, retry_wait: float = 2.0, tables: Any = None) -> None:
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key_env, self.timeout, self.max_retries = api_key_env, timeout, max_retries
        self.max_tokens, self.retry_wait = max_tokens, retry_wait
        self.tables = tables  # record -> (table text, detail): e.g. judge_table.JudgeTables (None: no table)
        self.cache_path = Path(cache_path) if cache_path else None
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # A judge on this machine is reached directly, whatever HTTP(S)_PROXY says.
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)
        self.calls = 0  # HTTP requests made (for reports and tests)
        self._lock = threading.Lock()
        self._cache: dict[str, dict] | None = None

    def describe(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "cache": str(self.cache_path or ""),
                "table": self.tables.describe() if hasattr(self.tables, "describe") else None}

    # ---- prompt and cache -----------------------------------------------------------------
    def messages(self, question: str, reference: str, prediction: str, sub_qtype: str,
                 table: str | None = None) -> list[dict]:
        body = _TEMPLATE.format(
            sub_qtype=sub_qtype, question=question or "", reference=reference or "",
            prediction=prediction or "(empty)", rubric=_RUBRIC.get(sub_qtype, _RUBRIC["Summary Analysis"]),
            table=f"\nTable:\n{table}\n" if table else "")
        return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": body}]

    def cache_key(self, messages: list[dict]) -> str:
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return f"{self.model}\0{digest}"

    def _load_cache(self) -> dict[str, dict]:
        if self._cache is None:
            self._cache = {}
            if self.cache_path and self.cache_path.exists():
                with open(self.cache_path, encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            entry = json.loads(line)
                            self._cache[entry["model"] + "\0" + entry["prompt_sha256"]] = entry
                        except (ValueError, KeyError, TypeError):
                            continue  # a torn last line after a crash is not fatal
        return self._cache

    def _store(self, key: str, entry: dict) -> None:
        self._cache[key] = entry
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    # ---- judging --------------------------------------------------------------------------
    def score(self, question: str, reference: str, prediction: str, sub_qtype: str,
              table: str | None = None) -> dict:
        """``{"judge_score", "judge_model", "cached", "judge_reply"}``; raises JudgeError on failure
        (nothing is cached then, so the sample can be judged again later)."""
        messages = self.messages(question, reference, prediction, sub_qtype, table)
        key = self.cache_key(messages)
        with self._lock:
            hit = self._load_cache().get(key)
        if hit is not None:
            return {"judge_score": hit["score"], "judge_model": self.model, "cached": True,
                    "judge_reply": hit.get("reply", "")}
        reply = self._complete(messages)
        score = parse_score(reply)
        entry = {"model": self.model, "prompt_sha256": key.split("\0", 1)[1], "score": score,
                 "reply": reply, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with self._lock:
            self._load_cache()
            self._store(key, entry)
        return {"judge_score": score, "judge_model": self.model, "cached": False, "judge_reply": reply}

    def _complete(self, messages: list[dict]) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_wait * attempt)
            request = urllib.request.Request(f"{self.base_url}/chat/completions", method="POST",
                                             data=json.dumps(payload).encode(), headers=headers)
            with self._lock:
                self.calls += 1
            try:
                with self._opener.open(request, timeout=self.timeout) as resp:
                    data: Any = json.loads(resp.read().decode("utf-8"))
                return str(data["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} from {self.base_url}: {exc.read()[:200].decode(errors='replace')}"
                if exc.code not in (408, 409, 429) and exc.code < 500:
                    break  # a client error will not fix itself
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last = f"cannot reach {self.base_url}: {getattr(exc, 'reason', exc)}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"malformed reply from {self.base_url}: {type(exc).__name__}: {exc}"
        raise JudgeError(last)

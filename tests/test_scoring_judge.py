"""The LLM judge against a tiny OpenAI-style server on 127.0.0.1 (loopback only)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from hitbench_utils.scoring.judge import Judge, JudgeError, parse_score
from hitbench_utils.scoring.records import rescore_records, score_record


class FakeOpenAI:
    """Answers /v1/chat/completions with ``reply`` (or ``status``), and records every request."""

    def __init__(self) -> None:
        self.reply = "The summary covers the main trend.\n[Score]: 85/100"
        self.status = 200
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if fake.status != 200:
                    self.send_response(fake.status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "overloaded"}')
                    return
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": fake.reply}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def record(rid: int = 1, sub: str = "Summary Analysis", **kw: object) -> dict:
    base = {"id": rid, "question_type": "Data Analysis", "sub_qtype": sub, "status": "ok", "file_name": "t",
            "question": "Summarise the table.", "reference": "Sales rose every year.",
            "prediction": "Sales increased each year.", "response": "... [Final Answer]: Sales increased each year."}
    base.update(kw)
    return base


@pytest.mark.parametrize("text, score", [
    ("[Score]: 85/100", 85.0),
    ("Score: 85 / 100", 85.0),
    ("**[Score]:** 85", 85.0),
    ("[score] = 72.5", 72.5),
    ("reasoning... [Score]: 40/100\nfinal [Score]: 90/100", 90.0),  # the last one counts
    ("[Score]: 8.5/10", 85.0),
    ("[Score]：100", 100.0),
])
def test_parse_score(text: str, score: float) -> None:
    assert parse_score(text) == score


@pytest.mark.parametrize("text", ["no score here", "[Score]: 150/100", ""])
def test_parse_score_rejects(text: str) -> None:
    with pytest.raises(JudgeError):
        parse_score(text)


def test_judge_scores_and_caches(server: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HB_TEST_JUDGE_KEY", "sk-test")
    cache = tmp_path / "judge_cache.jsonl"
    judge = Judge(server.url, "judge-model", api_key_env="HB_TEST_JUDGE_KEY", cache_path=cache)
    out = score_record(record(), xlsx_path=None, judge=judge)
    assert out["scores"] == {"judge": 85.0} and out["score_status"] == "scored"
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and "[Score]: N/100" in req["body"]["messages"][-1]["content"]
    assert "Sales increased each year." in req["body"]["messages"][-1]["content"]
    # Second call: from the cache, the server is not asked again.
    again = score_record(record(), xlsx_path=None, judge=judge)
    assert again["scores"] == {"judge": 85.0} and again["score_detail"]["judge_cached"] is True
    assert len(server.requests) == 1
    # A new Judge object reads the cache file; a different judge model is a different key.
    fresh = Judge(server.url, "judge-model", api_key_env="HB_TEST_JUDGE_KEY", cache_path=cache)
    assert fresh.score("Summarise the table.", "Sales rose every year.", "Sales increased each year.",
                       "Summary Analysis")["cached"] is True
    assert len(server.requests) == 1
    other = Judge(server.url, "other-model", api_key_env=None, cache_path=cache)
    other.score("Summarise the table.", "Sales rose every year.", "Sales increased each year.", "Summary Analysis")
    assert len(server.requests) == 2 and server.requests[1]["auth"] is None
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert {e["model"] for e in lines} == {"judge-model", "other-model"}


def test_failing_judge_is_recorded_and_rejudgeable(server: FakeOpenAI, tmp_path: Path) -> None:
    judge = Judge(server.url, "judge-model", api_key_env=None, cache_path=tmp_path / "c.jsonl",
                  max_retries=1, retry_wait=0.01)
    server.status = 503
    out = score_record(record(sub="Anomaly Analysis"), xlsx_path=None, judge=judge)
    assert out["score_status"] == "error" and "judge error" in out["score_error"] and "503" in out["score_error"]
    assert len(server.requests) == 2  # retried once
    server.status, server.reply = 200, "I am not sure."
    out = score_record(record(sub="Anomaly Analysis"), xlsx_path=None, judge=judge)
    assert out["score_status"] == "error" and "no [Score]" in out["score_error"]
    # Later, with the judge healthy, the same saved record is judged without any inference.
    server.reply = "Good.\n[Score]: 70/100"
    failed = dict(record(sub="Anomaly Analysis"), **out)
    [rescored] = rescore_records([failed], data_path=tmp_path, judge=judge)
    assert rescored["score_status"] == "scored" and rescored["scores"] == {"judge": 70.0}
    assert rescored["score_error"] is None and rescored["prediction"] == failed["prediction"]


def test_unreachable_judge(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = Judge(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, timeout=2, max_retries=0)
    out = score_record(record(), xlsx_path=None, judge=judge)
    assert out["score_status"] == "error" and "cannot reach" in out["score_error"]


def test_unscored_without_judge() -> None:
    for sub in ("Summary Analysis", "Anomaly Analysis"):
        assert score_record(record(sub=sub), xlsx_path=None) == {"scores": {}, "score_status": "unscored",
                                                                  "score_error": None}
    # The other Data Analysis sub-types get QA metrics, with or without a judge.
    out = score_record(record(sub="Rudimentary Analysis"), xlsx_path=None)
    assert out["score_status"] == "scored" and set(out["scores"]) == {"F1", "EM", "ROUGE-L", "SacreBLEU"}

"""The OpenAI-compatible backend against a real server: ``transformers serve`` running the tiny Qwen3-VL
on loopback (CPU), started here as a subprocess and stopped at the end.

Covered against that server: images as data URLs (the answer equals the local HF model's, and the
prompt count, image tokens included, equals the server's), concurrency (bounded, shared across calls,
results in order), a server killed and restarted mid-run (every record ok, thanks to retries), 4xx
failing at once, timeouts, a failed request not costing its batch-mates a second generation,
truncation without a local tokenizer, and a server that refuses ``top_k``. Two behaviours that
``transformers serve`` never shows (429 + Retry-After, a ``/tokenize`` endpoint) are checked at the end
against a few lines of ``http.server``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

for _mod in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_mod, reason="transformers serve needs transformers[serving] (fastapi, uvicorn, openai)")

from hitbench_utils.backends.base import GenRequest, GenSettings  # noqa: E402
from hitbench_utils.backends.openai import (OpenAIBackend, OpenAIError, estimating_tokenizer,  # noqa: E402
                                            image_token_count)
from hitbench_utils.backends.openai_http import served_identity  # noqa: E402
from hitbench_utils.backends.tiny import tiny_model_dir  # noqa: E402
from hitbench_utils.config import RunConfig  # noqa: E402
from hitbench_utils.engine import Engine  # noqa: E402
from hitbench_utils.errors import SampleTimeout, status_of  # noqa: E402
from hitbench_utils.run import Job, load_backend  # noqa: E402
from hitbench_utils.runlog import read_log, view  # noqa: E402

pytestmark = pytest.mark.timeout(300)
START_TIMEOUT = 120      # seconds for the server to answer /health


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``transformers serve <tiny> --host 127.0.0.1 --port P`` in its own process group."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.port, self.log = str(model), _free_port(), log
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            try:
                with opener.open(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"transformers serve not ready in {START_TIMEOUT}s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_model_dir(), tmp_path_factory.mktemp("serve") / "serve.log")
    s.start()
    try:
        yield s
    finally:
        s.kill()


def backend(server: Server, **kw) -> OpenAIBackend:
    kw.setdefault("tokenizer", server.model)
    kw.setdefault("backoff_base", 0.2)
    return OpenAIBackend("openai:" + server.model, base_url=server.url, **kw)


def messages(text: str, image: bool = False) -> list[dict]:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "system", "content": "You answer questions about tables."}, {"role": "user", "content": content}]


def picture(w: int, h: int, colour=(200, 30, 30)):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (255, 255, 255))
    ImageDraw.Draw(img).rectangle([w // 4, h // 4, w // 2, h // 2], fill=colour)
    return img


GREEDY = GenSettings(max_new_tokens=6)


# ---- images, token counts ---------------------------------------------------------------------------
def test_images_go_as_data_urls_and_counts_match_the_server(server, tiny_backend):
    be = backend(server)
    img = picture(300, 200)
    reqs = [GenRequest(1, messages("What is red?", image=True), img), GenRequest(2, messages("What is red?"))]
    for r in reqs:
        r.input_tokens = be.count_tokens(r.messages, r.image)
    out = be.generate(reqs, GenSettings(max_new_tokens=6, seed=3))
    local = tiny_backend.generate(reqs, GenSettings(max_new_tokens=6, seed=3))
    assert [o.text.strip() for o in out] == [x.text.strip() for x in local]   # the server saw the same image
    assert be.image_tokens(img) == tiny_backend.image_tokens(img) == image_token_count(img, be._image_cfg)
    for r, o in zip(reqs, out):
        assert o.input_tokens == o.extra["prompt_tokens_server"] == r.input_tokens == tiny_backend.count_tokens(r.messages, r.image)
        assert o.output_tokens == 6 and o.extra["finish_reason"] == "length"   # the server's usage
    assert out[0].input_tokens - out[1].input_tokens == be.image_tokens(img) + 2   # vision start/end
    other = be.generate([GenRequest(3, messages("What is red?", image=True), picture(300, 200, (20, 20, 220)))], GREEDY)
    assert other[0].input_tokens == out[0].input_tokens   # same size, other pixels: same count...
    assert be.stats["http_calls"] >= 3 and be.info["token_counts"] == "local"


def test_qwen_image_token_estimate_matches_the_processor():
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16, merge_size=2)
    for w, h in [(32, 32), (300, 200), (1001, 333), (2000, 10), (4100, 4100), (640, 480)]:
        grid = proc(images=[picture(w, h)], return_tensors="pt")["image_grid_thw"][0]
        assert image_token_count((w, h)) == int(grid.prod()) // 4, (w, h)


# ---- concurrency ------------------------------------------------------------------------------------
def test_concurrency_is_bounded_shared_and_ordered(server):
    be = backend(server, concurrency=3)
    reqs = [GenRequest(i, messages(f"Question number {i} about row {i * 7}?")) for i in range(8)]
    one_by_one = [be.generate([r], GREEDY)[0].text for r in reqs[:3]]
    out = be.generate(reqs, GREEDY)
    assert [o.text for o in out[:3]] == one_by_one                       # in order, and greedy is repeatable
    assert len({o.text for o in out}) > 1
    assert be.stats["max_in_flight"] == 3
    # two callers at once still share the same 3 slots
    be.stats["max_in_flight"] = 0
    threads = [threading.Thread(target=be.generate, args=(reqs[k::2], GREEDY)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and be.stats["max_in_flight"] == 3
    be.close()


# ---- a server restart in the middle of a run ------------------------------------------------------------
class KillsTheServer(OpenAIBackend):
    """After ``after`` answers, SIGKILL the server and start it again on the same port 2 s later."""

    def __init__(self, *a, server: Server, after: int, **kw) -> None:
        super().__init__(*a, **kw)
        self.server, self.after, self.answers, self.restarter = server, after, 0, None

    def _one(self, req, settings):
        res = super()._one(req, settings)
        with self._lock:
            self.answers += 1
            fire = self.answers == self.after
        if fire:
            self.server.kill()

            def restart():
                time.sleep(2)
                self.server.start(wait=False)

            self.restarter = threading.Thread(target=restart)
            self.restarter.start()
        return res


@pytest.mark.slow
def test_a_run_survives_a_server_restart(server, sample_data, tmp_path):
    be = KillsTheServer("openai:" + server.model, base_url=server.url, tokenizer=server.model, concurrency=4,
                        max_retries=40, backoff_base=0.5, backoff_max=2.0, server=server, after=3)
    cfg = RunConfig(model="openai:" + server.model, base_url=server.url, data_path=str(sample_data), modality="mix",
                    format="csv", limit=10, batch_size=4, max_new_tokens=4, max_reasks=0, score=False,
                    run_dir=str(tmp_path / "run"))
    starts = server.starts
    try:
        summary = Job(cfg, backend=be, progress=False).execute()
    finally:   # never leave a restart pending: the fixture must be able to stop what runs
        if be.restarter is not None:
            be.restarter.join(timeout=60)
        server.wait_ready()                                              # up again for the other tests
    assert server.starts == starts + 1
    assert summary["ok"] == 10 and summary["verdict"] == "complete", summary
    recs = view(read_log(tmp_path / "run").records)
    assert all(r["status"] == "ok" and r["image_tokens"] > 0 and r["output_tokens"] == 4 for r in recs.values())
    assert be.stats["retries"] > 0 and be.stats["failed"] == 0
    # the local count of every prompt (image included) is what the server counted
    assert be.stats["prompt_tokens"] == sum(r["input_tokens_sent"] for r in recs.values())


# ---- failures ---------------------------------------------------------------------------------------
def test_a_client_error_fails_at_once_with_the_servers_message(server):
    be = OpenAIBackend("openai:no-such-model", base_url=server.url, check=False, max_retries=5)
    with pytest.raises(OpenAIError, match="pinned to") as e:
        be.generate([GenRequest(1, messages("hi"))], GREEDY)
    assert e.value.http_status == 400 and be.stats["http_calls"] == 1 and status_of(e.value) == "exception"


def test_a_failed_request_does_not_cost_its_batch_mates_a_second_generation(server):
    be = backend(server, max_retries=1, backoff_base=0.01)
    calls = be.stats["http_calls"]                               # the start-up check's GET /models
    reqs = [GenRequest(i, messages(f"row {i}?")) for i in range(3)]
    reqs.insert(1, GenRequest(99, messages("a 1x300 image", image=True), picture(1, 300)))   # the server fails it: 500
    got = {r.key: res for r, res, _ in Engine(be, batch_size=4, token_budget=10**9).run(reqs, GREEDY)}
    assert isinstance(got[99], OpenAIError) and "HTTP 500" in str(got[99])
    assert all(got[i].output_tokens == 6 for i in range(3))
    assert be.stats["requests"] == 4            # each request generated once: the re-runs were answered from memory
    assert be.stats["reused_outcomes"] == 4 and be.stats["http_calls"] - calls == 5   # + one retry of the 500


def test_timeouts_are_retried_then_become_timeout_records(server):
    be = backend(server, request_timeout=0.05, max_retries=1, backoff_base=0.01)
    calls = be.stats["http_calls"]
    with pytest.raises(SampleTimeout) as e:
        be.generate([GenRequest(1, messages("hi"))], GenSettings(max_new_tokens=40))
    assert status_of(e.value) == "timeout" and be.stats["http_calls"] - calls == 2
    quick = backend(server, max_retries=3)
    calls = quick.stats["http_calls"]
    with pytest.raises(SampleTimeout, match="max_time_per_sample"):     # a per-sample cap is not retried
        quick.generate([GenRequest(1, messages("hi"))], GenSettings(max_new_tokens=40, max_time=0.05))
    assert quick.stats["http_calls"] - calls == 1


# ---- without a local tokenizer -----------------------------------------------------------------------
def test_without_a_tokenizer_counts_are_estimated_and_truncation_still_cuts(server, sample_data, tmp_path):
    be = OpenAIBackend("openai:" + server.model, base_url=server.url, concurrency=4)
    assert be.info["token_counts"] == "estimated"        # transformers serve has no /tokenize
    seen = []
    orig = be._one
    be._one = lambda req, s: seen.append(orig(req, s)) or seen[-1]
    cfg = RunConfig(model="openai:" + server.model, base_url=server.url, data_path=str(sample_data), format="markdown",
                    limit=6, batch_size=4, max_new_tokens=2, max_reasks=0, score=False, max_input_tokens=600,
                    run_dir=str(tmp_path / "run"))
    s = Job(cfg, backend=be, progress=False).execute()
    assert s["ok"] == 6, s
    recs = view(read_log(tmp_path / "run").records).values()
    assert all(r["truncated"] and r["input_tokens_sent"] <= 600 for r in recs)
    for res in seen:   # the estimate against the server's count: within the documented range
        ratio = res.extra["prompt_tokens_counted"] / res.extra["prompt_tokens_server"]
        assert 0.9 <= ratio <= 1.5, res.extra
        assert res.extra["prompt_tokens_server"] <= 600 * 1.1


def test_estimating_tokenizer_gives_offsets_and_keeps_special_tokens():
    tok = estimating_tokenizer()
    enc = tok.encode("<|im_start|>user\nTotal 2023: 1,234.5<|im_end|>", add_special_tokens=False)
    pieces = ["<|im_start|>", "user", "\n", "Total", " ", "2", "0", "2", "3", ":", " ", "1", ",", "2", "3", "4",
              ".", "5", "<|im_end|>"]
    text = "<|im_start|>user\nTotal 2023: 1,234.5<|im_end|>"
    assert [text[a:b] for a, b in enc.offsets] == pieces


def test_a_refused_sampling_field_is_dropped_once_and_recorded(server):
    be = backend(server)
    out = be.generate([GenRequest(1, messages("hi"))], GenSettings(max_new_tokens=3, temperature=0.7, top_k=20))
    assert out[0].output_tokens == 3 and be.info["dropped_params"] == ["top_k"]
    calls = be.stats["http_calls"]
    be.generate([GenRequest(2, messages("hi again"))], GenSettings(max_new_tokens=3, temperature=0.7))
    assert be.stats["http_calls"] == calls + 1                           # not asked again


def test_load_backend_dispatches_openai_models(server):
    cfg = RunConfig(model="openai:" + server.model, base_url=server.url, concurrency=2, max_retries=1,
                    request_timeout=30, tokenizer=server.model)
    be = load_backend(cfg)
    assert isinstance(be, OpenAIBackend) and be.concurrency == 2 and be.max_retries == 1
    # the identity is what the server says it serves, not its URL (test_openai_served.py resumes elsewhere)
    assert be.identity == served_identity(cfg.model, server.url, tokenizer=server.model)
    assert be.identity["served"]["id"] == server.model and "base_url" not in be.identity
    assert be.info["base_url"] == server.url and be.info["model"] == server.model


# ---- what transformers serve never does: 429 + Retry-After, /tokenize ------------------------------------
class _Stub(BaseHTTPRequestHandler):
    hits: list = []

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code, body, headers=()):
        raw = json.dumps(body).encode()
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._send(200, {"data": [{"id": "m"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).hits.append((self.path, time.monotonic(), self.headers.get("Authorization")))
        if self.path == "/tokenize":
            return self._send(200, {"count": len(body["prompt"].split()), "max_model_len": 4096})
        if sum(p == "/v1/chat/completions" for p, _, _ in type(self).hits) == 1:
            return self._send(429, {"error": {"message": "slow down"}}, [("Retry-After", "1")])
        self._send(200, {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 1}})


def test_429_honours_retry_after_and_tokenize_is_used(monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HB_TEST_KEY", "sekret")
        be = OpenAIBackend("openai:m", base_url=f"http://127.0.0.1:{httpd.server_port}/v1", api_key_env="HB_TEST_KEY",
                           backoff_base=0.01)
        assert be.info["token_counts"] == "server"
        assert be.count_tokens(messages("one two three")) == len(be.chat_text(messages("one two three")).split())
        out = be.generate([GenRequest(1, messages("hi"))], GREEDY)
        assert out[0].text == "ok" and out[0].input_tokens == 5 and out[0].extra["retries"] == 1
        chats = [t for p, t, _ in _Stub.hits if p == "/v1/chat/completions"]
        assert chats[1] - chats[0] >= 0.95                                 # waited as told, not 0.01 s
        assert all(a == "Bearer sekret" for _, _, a in _Stub.hits)
    finally:
        httpd.shutdown()
        httpd.server_close()

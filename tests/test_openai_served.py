"""What is served, not where: the fingerprint's identity of an OpenAI-compatible model, resuming at
another address; results streamed as they complete; and a kill at a server (issue 13 §1)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from hitbench_utils.backends.base import GenRequest, GenSettings
from hitbench_utils.backends.openai import BadReply, OpenAIBackend
from hitbench_utils.backends.openai_http import served_identity
from hitbench_utils.errors import ConfigError, FingerprintMismatch, ModelLoadError
from hitbench_utils.run import run
from hitbench_utils.runlog import read_log, view

from fake_openai import FakeOpenAI, user_text

pytestmark = pytest.mark.timeout(300)
SERVED = {"id": "x", "object": "model", "root": "/models/Qwen3-VL-8B-Instruct", "owned_by": "vllm",
          "max_model_len": 131072}


# ---- identity ------------------------------------------------------------------------------------------
def test_the_identity_is_what_is_served_not_the_address():
    with FakeOpenAI(served=SERVED) as a, FakeOpenAI(served=SERVED) as b, \
            FakeOpenAI(served={**SERVED, "root": "/models/Qwen3-VL-2B-Instruct"}) as other:
        ident = served_identity("openai:x", a.url)
        assert ident == {"path": "openai:x", "tokenizer": None,
                         "served": {k: SERVED[k] for k in ("id", "root", "owned_by", "max_model_len")}}
        assert served_identity("openai:x", f"http://localhost:{a.port}/v1") == ident      # no 'created', no URL
        assert served_identity("openai:x", b.url) == ident
        assert served_identity("openai:x", other.url) != ident
        assert served_identity("openai:x", f"{a.url},{b.url}") == ident                  # a fleet of one model
        with pytest.raises(ConfigError, match="servers that all serve the same model"):
            served_identity("openai:x", f"{a.url},{other.url}")
        assert served_identity("openai:y", a.url)["served"] is None                       # not listed there
        be = OpenAIBackend("openai:x", base_url=f"http://localhost:{a.port}/v1")
        assert be.identity == ident == be.info["identity"]                                 # injected or not: one fingerprint
        url = a.url
    with pytest.raises(ModelLoadError, match="cannot reach"):
        served_identity("openai:x", url, max_retries=0)
    with pytest.raises(ConfigError, match="base_url"):
        served_identity("openai:x", None)


def test_resume_moves_to_another_address_but_refuses_another_model(sample_data, tmp_path):
    params = dict(model="openai:x", data_path=str(sample_data), modality="text", format="csv", max_reasks=0,
                  score=False, progress=False, run_dir=str(tmp_path / "run"))
    with FakeOpenAI(served=SERVED) as first:
        s = run(base_url=first.url, limit=3, **params)
    assert s["ok"] == 3
    with FakeOpenAI(served=SERVED) as moved:
        s = run(base_url=f"http://localhost:{moved.port}/v1", limit=6, **params)
        assert s["ok"] == 6 and s["verdict"] == "complete" and moved.answers == 3      # resumed: only the new 3
    assert [r["attempt"] for r in read_log(tmp_path / "run").records] == [1] * 6
    with FakeOpenAI(served={**SERVED, "root": "/models/Qwen3-VL-2B-Instruct"}) as other:
        with pytest.raises(FingerprintMismatch, match="Qwen3-VL-2B"):
            run(base_url=other.url, limit=8, **params)
        assert other.answers == 0


# ---- results as they complete ---------------------------------------------------------------------------
def slow_by_text(body: dict) -> float:
    """A request asking 'wait N' is answered after N seconds."""
    words = user_text(body).split()
    return float(words[1]) if words[0] == "wait" else 0.0


def request(i: int, text: str) -> GenRequest:
    return GenRequest(i, [{"role": "user", "content": [{"type": "text", "text": text}]}])


def test_generate_stream_yields_each_result_as_it_finishes_with_bounded_concurrency():
    texts = ["wait 1.5", "wait 0.1", "wait 0.1", "wait 0.1", "wait 0.1", "boom"]
    pulled = []

    def lazily():
        for i, t in enumerate(texts):
            pulled.append(i)
            yield request(i, t)

    mode = lambda n, body: "null" if user_text(body) == "boom" else "final"   # noqa: E731
    with FakeOpenAI(mode, delay=slow_by_text) as fake:
        be = OpenAIBackend("openai:x", base_url=fake.url, concurrency=2, max_retries=0)
        stream = be.generate_stream(lazily(), GenSettings(max_new_tokens=8))
        first = next(stream)
        assert len(pulled) == 2                  # read one request per free slot, not all at once
        got = [first, *stream]
        assert sorted(i for i, _ in got) == list(range(6))
        assert got[0][0] == 1 and got[-1][0] == 0      # in the order they finished: the slow one held no other
        outcome = dict(got)
        assert isinstance(outcome[5], BadReply) and all(outcome[i].text for i in range(5))
        assert fake.max_in_flight == 2 and be.stats["max_in_flight"] == 2
        # closing a stream early cancels what has not started
        before = fake.chats
        stream = be.generate_stream([request(i, "wait 0.3") for i in range(8)], GenSettings(max_new_tokens=8))
        next(stream)
        stream.close()
        time.sleep(0.8)
        assert fake.chats - before <= 4
        assert [r.text for r in be.generate([request(1, "a"), request(2, "b")], GenSettings())] != []   # generate still works


# ---- a kill -9 at a server (issue 13 §1) ----------------------------------------------------------------
KILL_SCRIPT = """
import sys
from hitbench_utils.run import run
run(model="openai:x", base_url=sys.argv[1], data_path=sys.argv[2], run_dir=sys.argv[3], modality="text",
    format="csv", max_reasks=int(sys.argv[4]), concurrency=int(sys.argv[5]), max_retries=0, score=False,
    progress=False)
"""


@pytest.mark.parametrize("max_reasks", [2, 0])
def test_kill_at_a_server_loses_only_the_requests_in_flight(sample_data, tmp_path, max_reasks):
    """Answers lack the final line, so every sample is asked 1 + max_reasks times. SIGKILL the run after
    N answers served: the log must hold at least N/(1 + max_reasks) − concurrency final records. (Fails
    while re-asks wait for round 0 of the whole run: then it holds none.)"""
    n, concurrency = 30, 2
    run_dir = tmp_path / "run"
    with FakeOpenAI("nofinal", delay=0.02) as fake:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, fake.url, str(sample_data), str(run_dir),
                                 str(max_reasks), str(concurrency)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 240
            while fake.answers < n and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.002)
            served = fake.answers
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            err = proc.communicate(timeout=60)[1].decode()[-3000:]
    assert served >= n, f"the run answered only {served} before it ended: {err}"
    recs = view(read_log(run_dir).records).values() if (run_dir / "samples.jsonl").exists() else []
    final = [r for r in recs if r["status"] == "ok" and (r["answer_format_ok"] or r["reasks"] == max_reasks)]
    need = served / (1 + max_reasks) - concurrency
    assert len(final) >= need, (f"{served} answers served, {len(final)} final records logged; need ≥ {need:g} "
                                "(a kill may lose only the requests in flight)")

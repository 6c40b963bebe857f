"""The API key's value never reaches what a run stores, even when a server echoes it back: redact.py
itself, the backend (answers, errors, log lines), and a whole run folder."""
from __future__ import annotations

import logging
import secrets as pysecrets

import pytest

from hitbench_utils.backends.base import GenRequest, GenSettings
from hitbench_utils.backends.openai import OpenAIBackend
from hitbench_utils.errors import OpenAIError
from hitbench_utils.redact import MASK, redact, secret_values
from hitbench_utils.run import run

from fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(300)
KEY_ENV = "HB_TEST_SERVER_CREDENTIAL"          # a name without KEY/TOKEN...: found because it is named


@pytest.fixture
def key(monkeypatch) -> str:
    value = "sk-test-" + pysecrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, value)
    return value


# ---- redact.py -----------------------------------------------------------------------------------------
def test_secret_values_are_the_named_variables_and_those_named_like_secrets():
    env = {"MY_API": "named-value", "HF_TOKEN": "hf_0123456789", "DB_PASSWORD": "hunter22", "MY_SECRET": "short",
           "SOME_KEY_X": "k" * 30, "PATH": "/usr/bin:/bin", "TINY": "abc", "SHORTKEY": "1234567",
           "TOKENIZER_DIR": "/models/qwen3-vl", "TOKENIZERS_PARALLELISM": "false-ish"}
    got = secret_values(["MY_API", "TINY", None], env)
    assert set(got) == {"named-value", "hf_0123456789", "hunter22", "k" * 30}   # short ones: left alone
    assert got == sorted(got, key=len, reverse=True)                                # longest first
    assert secret_values([], {}) == []


def test_redact_walks_strings_bytes_dicts_lists_and_tuples():
    s = ["abcdefgh-long", "abcdefgh"]
    obj = {"text": "key abcdefgh-long and abcdefgh", "abcdefgh": [b"x abcdefgh", ("abcdefgh", 3)], "n": 7, "f": None}
    out = redact(obj, s)
    assert out == {"text": f"key {MASK} and {MASK}", MASK: [b"x ***", (MASK, 3)], "n": 7, "f": None}
    assert obj["text"].startswith("key abcdefgh-long")          # the input is not changed
    assert redact("nothing", []) == "nothing" and redact(5, s) == 5
    assert isinstance(redact(("abcdefgh",), s), tuple) and isinstance(redact(bytearray(b"abcdefgh"), s), bytearray)


# ---- the backend ---------------------------------------------------------------------------------------
class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_the_backend_never_returns_raises_or_logs_the_key(key):
    lines = Lines()
    logging.getLogger("hitbench").addHandler(lines)
    try:
        with FakeOpenAI("echo_key") as fake:
            be = OpenAIBackend("openai:x", base_url=fake.url, api_key_env=KEY_ENV, max_retries=1, backoff_base=0.01)
            req = GenRequest(1, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
            [res] = be.generate([req], GenSettings(max_new_tokens=8))
            assert fake.seen[-1]["auth"] == f"Bearer {key}"                  # the server did get the key...
            assert key not in res.text and res.text.count(MASK) == 3           # ...and its echo was masked
            fake.mode = "500_echo"
            with pytest.raises(OpenAIError) as e:
                be.generate([req], GenSettings(max_new_tokens=8))
    finally:
        logging.getLogger("hitbench").removeHandler(lines)
    assert "HTTP 500" in str(e.value) and "invalid key Bearer ***" in str(e.value) and key not in str(e.value)
    assert any("invalid key Bearer ***" in ln for ln in lines.lines)   # the retry warning, masked
    assert not any(key in ln for ln in lines.lines)


def test_a_run_folder_never_holds_the_key(key, sample_data, tmp_path):
    """Every file of the run folder (run.log, samples.jsonl, results.json, plan.json, charts/...), after a
    run whose server echoes the key in its answers, in 500 error bodies and in ``content: null`` replies."""
    modes = ["echo_key", "500_echo", "echo_key", "null"]
    run_dir = tmp_path / "run"
    with FakeOpenAI(lambda n, body: modes[n % len(modes)]) as fake:
        s = run(model="openai:x", base_url=fake.url, api_key_env=KEY_ENV, data_path=str(sample_data), modality="text",
                format="csv", limit=12, max_reasks=1, max_retries=1, concurrency=2, run_dir=str(run_dir), progress=False,
                question_type=["Visualization", "Fact Checking", "Data Analysis"])
        assert all(x["auth"] == f"Bearer {key}" for x in fake.seen)
    assert s["ok"] > 0 and s["errors"], s                         # echoes answered, 500s and nulls failed
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"samples.jsonl", "run.log", "results.json"} <= {p.name for p in files}
    leaks = [str(p.relative_to(run_dir)) for p in files if key.encode() in p.read_bytes()]
    assert leaks == [], f"the key's bytes are in {leaks}"
    assert MASK.encode() in (run_dir / "samples.jsonl").read_bytes()          # the echoes did arrive, masked
    assert b"invalid key Bearer ***" in (run_dir / "run.log").read_bytes()


def test_the_logging_filter_masks_messages_and_tracebacks(tmp_path):
    from hitbench_utils.redact import RedactingFilter

    handler = logging.FileHandler(tmp_path / "run.log", encoding="utf-8")
    handler.addFilter(RedactingFilter(["hunter2-very-secret"]))
    lg = logging.getLogger("hitbench.test_redact")
    lg.addHandler(handler)
    try:
        lg.warning("server said %s", "bad key hunter2-very-secret")
        try:
            raise ValueError("echo hunter2-very-secret")
        except ValueError:
            lg.exception("failed")
    finally:
        lg.removeHandler(handler)
        handler.close()
    text = (tmp_path / "run.log").read_text()
    assert "hunter2-very-secret" not in text
    assert "server said bad key ***" in text and "ValueError: echo ***" in text

"""Server replies are data: every shape a chat-completions server may send becomes an answer (its text a
str) or a typed error record, never a crashed run. Pure parsing first, then the backend and a whole run
against the local fake server (tests/fake_openai.py)."""
from __future__ import annotations

import pytest

from hitbench_utils.backends.base import GenRequest, GenSettings
from hitbench_utils.backends.openai import BadReply, OpenAIBackend
from hitbench_utils.backends.openai_reply import parse_reply
from hitbench_utils.engine import Engine
from hitbench_utils.errors import OpenAIError, SampleError, status_of
from hitbench_utils.run import run
from hitbench_utils.runlog import read_log, view

from fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(300)
GREEDY = GenSettings(max_new_tokens=8)


def chat(message, usage=None, **choice):
    return {"choices": [{"message": message, "finish_reason": "stop", **choice}], "usage": usage}


# ---- parsing, no server ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content, text", [
    ("plain [Final Answer]: 1", "plain [Final Answer]: 1"),
    ("", ""),
    ([{"type": "text", "text": "a "}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "b"}],
     "a b"),
    ([{"type": "output_text", "text": "c"}, "d", {"type": "text", "text": 7}], "cd"),
    ({"type": "text", "text": "one part"}, "one part"),
])
def test_content_as_string_or_text_parts_is_the_answer(content, text):
    r = parse_reply(chat({"role": "assistant", "content": content}, {"prompt_tokens": 3, "completion_tokens": 2}))
    assert isinstance(r.text, str) and r.text == text
    assert (r.prompt_tokens, r.completion_tokens, r.finish_reason, r.ignored) == (3, 2, "stop", [])


@pytest.mark.parametrize("body, match", [
    (chat({"content": None, "reasoning_content": "hmm"}), r"content null \(finish_reason='stop', the tokens went to reasoning_content"),
    (chat({"content": None, "refusal": "I cannot"}), "refusal: \"I cannot\""),
    (chat({"content": [{"type": "image_url", "image_url": {}}]}), "content without text"),
    (chat({"content": 42}), "content without text \\(42\\)"),
    ({"choices": []}, r"'choices' is \[\], so no answer"),
    ({"id": "x"}, "no 'choices', so no answer"),
    ({"choices": "nope"}, "'choices' is \"nope\""),
    ({"choices": [None]}, "a choice that is not an object"),
    ({"choices": [{"finish_reason": "stop"}]}, "a choice without a message object"),
    ({"error": {"message": "model overloaded"}}, "answered with an error \\(\"model overloaded\"\\)"),
    ([1, 2], "not a JSON object \\(\\[1, 2\\]\\)"),
    (None, "not a JSON object"),
])
def test_replies_without_an_answer_are_bad_replies(body, match):
    with pytest.raises(BadReply, match=match) as e:
        parse_reply(body, "http://srv/v1")
    assert status_of(e.value) == "exception" and isinstance(e.value, SampleError) and "http://srv/v1" in str(e.value)


def test_usage_of_the_wrong_type_is_ignored_not_trusted():
    r = parse_reply(chat({"content": "x"}, usage="lots"))
    assert (r.prompt_tokens, r.completion_tokens, r.ignored) == (None, None, ['usage="lots"'])
    r = parse_reply(chat({"content": "x"}, usage={"prompt_tokens": "17", "completion_tokens": 9.5}))
    assert (r.prompt_tokens, r.completion_tokens) == (None, None) and len(r.ignored) == 2
    r = parse_reply(chat({"content": "x"}, usage={"prompt_tokens": True, "completion_tokens": -1}))
    assert (r.prompt_tokens, r.completion_tokens) == (None, None)
    assert parse_reply({"choices": [{"text": "legacy", "finish_reason": 3}]}).text == "legacy"   # completions style


# ---- the backend against the fake server -----------------------------------------------------------------
def backend(fake: FakeOpenAI, **kw) -> OpenAIBackend:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("max_retries", 1)
    return OpenAIBackend("openai:x", base_url=fake.url, **kw)


def messages(text: str = "How much?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


OUTCOME = {"final": "answer", "nofinal": "answer", "list": "answer", "bad_usage": "answer", "echo_key": "answer",
           "null": "content null", "empty_choices": "'choices' is []", "no_choices": "no 'choices'",
           "error_200": "model overloaded", "html": "not JSON", "truncated": "not JSON", "500_echo": "HTTP 500"}


@pytest.mark.parametrize("mode", FakeOpenAI.MODES)
def test_every_reply_shape_is_an_answer_or_a_typed_error(mode):
    assert set(OUTCOME) == set(FakeOpenAI.MODES)
    with FakeOpenAI(mode) as fake:
        be = backend(fake)
        calls = be.stats["http_calls"]
        [(req, res, _)] = list(Engine(be, batch_size=1).run([GenRequest(1, messages())], GREEDY))
        if OUTCOME[mode] == "answer":
            assert isinstance(res.text, str) and res.text and res.output_tokens > 0, res
            if mode == "list":
                assert res.text == "The table shows 42.\n[Final Answer]: 42"
            if mode == "bad_usage":
                assert res.extra["completion_tokens_counted"] and res.input_tokens is None
                assert res.extra["reply_fields_ignored"] == ["usage.prompt_tokens=\"17\"", "usage.completion_tokens=9.5"]
        else:
            assert isinstance(res, OpenAIError) and status_of(res) == "exception", res
            assert OUTCOME[mode] in str(res)
            retried = mode in ("html", "truncated", "500_echo")       # transient shapes get the retry policy
            assert be.stats["http_calls"] - calls == (2 if retried else 1)
            assert isinstance(res, BadReply) == (mode != "500_echo")


def test_a_run_with_every_reply_shape_logs_each_sample_and_resumes(sample_data, tmp_path):
    """The issue's crash: list content broke prompts.py with a TypeError, on every resume."""
    modes = list(FakeOpenAI.MODES)
    with FakeOpenAI(lambda n, body: modes[n % len(modes)]) as fake:
        params = dict(model="openai:x", base_url=fake.url, data_path=str(sample_data), modality="text",
                      format="csv", limit=len(modes), max_reasks=0, max_retries=0, score=False, progress=False,
                      concurrency=2, run_dir=str(tmp_path / "run"))
        first = run(**params)
        recs = view(read_log(tmp_path / "run").records)
        assert len(recs) == len(modes) and first["ok"] + sum(first["errors"].values()) == len(modes)
        assert first["ok"] == 5 and first["errors"] == {"exception": 7}, first
        for r in recs.values():
            assert r["status"] in ("ok", "exception")
            if r["status"] == "ok":
                assert isinstance(r["response"], str) and isinstance(r["prediction"], str)
            else:
                assert r["error"].startswith(("BadReply:", "OpenAIError:")) and r["response"] is None
        failed = {i for i, r in recs.items() if r["status"] != "ok"}
        fake.mode = "list"                         # resume: the errors are retried, and now answered as lists
        second = run(**params)
        assert second["ok"] == len(modes) and second["verdict"] == "complete", second
        after = view(read_log(tmp_path / "run").records)
        assert {i for i, r in after.items() if r["attempt"] == 2} == failed
        assert all(after[i]["prediction"] == "42" and after[i]["answer_format_ok"] for i in failed)


def test_a_reply_too_large_to_read_is_a_bad_reply(monkeypatch):
    from hitbench_utils.backends import openai_http

    with FakeOpenAI("final") as fake:
        be = backend(fake)
        monkeypatch.setattr(openai_http, "MAX_BODY", 100)       # the fake's reply is ~300 bytes
        with pytest.raises(BadReply, match="over 100 bytes"):
            be.generate([GenRequest(1, messages())], GREEDY)
        assert be.stats["failed"] == 1


def test_a_tokenize_reply_without_a_count_is_a_bad_reply():
    with FakeOpenAI("final") as fake:
        be = backend(fake)
        be.count_source, be._tokenize_url = "server", fake.url + "/chat/completions"   # answers a chat reply
        with pytest.raises(BadReply, match="sent no 'count' nor 'tokens'"):
            be.count_tokens(messages())

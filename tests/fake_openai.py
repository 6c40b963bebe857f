"""A small OpenAI-compatible server for tests: loopback only, in a thread of the test process, bounded
(it shuts itself down after ``lifetime`` seconds), and scripted: each chat request gets the reply shape
its ``mode`` names.

Modes (``FakeOpenAI.MODES``): ``final`` (an answer with a ``[Final Answer]:`` line), ``nofinal`` (an
answer without one, so the run re-asks), ``list`` (``content`` as a list of parts, an image part among
them), ``null`` (``content: null``, the tokens spent on ``reasoning_content``), ``empty_choices``,
``no_choices``, ``error_200`` (a 200 holding ``{"error": ...}``), ``html`` (a 200 HTML page),
``truncated`` (JSON cut short), ``bad_usage`` (``usage`` of the wrong types), ``echo_key`` (the
request's API key inside the answer) and ``500_echo`` (HTTP 500 whose body echoes the key). ``mode``
may also be a function ``(n, body) -> mode`` of the request's number (from 0) and its JSON body.

``down()`` closes the port (connections are refused) and ``up()`` opens it again. ``answers`` counts
chat replies sent with HTTP 200 (also written to ``counter_file`` when given, for another process);
``max_in_flight`` the most chat requests handled at once.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

ANSWER = "The table shows 42 in the total row.\n[Final Answer]: 42"
NO_FINAL = "The table shows 42 in the total row."


class FakeOpenAI:
    MODES = ("final", "nofinal", "list", "null", "empty_choices", "no_choices", "error_200", "html", "truncated",
             "bad_usage", "echo_key", "500_echo")

    def __init__(self, mode: str | Callable[[int, dict], str] = "final", *, model: str = "x",
                 served: dict | None = None, delay: float | Callable[[dict], float] = 0.0, lifetime: float = 300.0,
                 counter_file: str | Path | None = None, port: int = 0) -> None:
        self.mode, self.model, self.delay, self.lifetime = mode, model, delay, lifetime
        self.served = served if served is not None else {"id": model, "object": "model", "root": f"/models/{model}",
                                                         "owned_by": "fake", "max_model_len": 32768}
        self.counter_file = Path(counter_file) if counter_file else None
        self.lock = threading.Lock()
        self.answers = self.chats = self.in_flight = self.max_in_flight = 0
        self.seen: list[dict] = []            # every chat request: {"path", "auth", "body"}
        self.port, self._httpd, self._thread, self._timer = port, None, None, None

    # ---- life ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def up(self) -> "FakeOpenAI":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        if self._timer is None:               # bounded: stops by itself whatever the test does
            self._timer = threading.Timer(self.lifetime, self.down)
            self._timer.daemon = True
            self._timer.start()
        return self

    def down(self) -> None:
        """Close the port: from now on connections are refused."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def stop(self) -> None:
        self.down()
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self) -> "FakeOpenAI":
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- replies ---------------------------------------------------------------------------------
    def reply(self, n: int, body: dict, auth: str | None) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body) for chat request number ``n``."""
        mode = self.mode(n, body) if callable(self.mode) else self.mode
        key = (auth or "").removeprefix("Bearer ").strip()

        def chat(message: dict, usage: Any = None, **extra: Any) -> tuple[int, str, bytes]:
            out = {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": self.model,
                   "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}],
                   "usage": usage if usage is not None else {"prompt_tokens": 17, "completion_tokens": 9}, **extra}
            return 200, "application/json", json.dumps(out).encode()

        if mode == "final":
            return chat({"content": ANSWER})
        if mode == "nofinal":
            return chat({"content": NO_FINAL})
        if mode == "list":
            return chat({"content": [{"type": "text", "text": "The table shows 42.\n"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "text", "text": "[Final Answer]: 42"}]})
        if mode == "null":
            return chat({"content": None, "reasoning_content": "Let me think about the table"})
        if mode == "bad_usage":
            return chat({"content": ANSWER}, usage={"prompt_tokens": "17", "completion_tokens": 9.5})
        if mode == "echo_key":
            return chat({"content": f"You sent the key {key} and 'Bearer {key}'.\n[Final Answer]: {key}"})
        if mode == "empty_choices":
            return 200, "application/json", json.dumps({"id": "x", "choices": []}).encode()
        if mode == "no_choices":
            return 200, "application/json", json.dumps({"id": "x", "object": "chat.completion"}).encode()
        if mode == "error_200":
            return 200, "application/json", json.dumps({"error": {"message": "model overloaded"}}).encode()
        if mode == "html":
            return 200, "text/html", b"<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
        if mode == "truncated":
            return 200, "application/json", json.dumps({"choices": [{"message": {"content": ANSWER}}]}).encode()[:25]
        if mode == "500_echo":
            return 500, "application/json", json.dumps({"error": {"message": f"invalid key Bearer {key}"}}).encode()
        raise ValueError(f"FakeOpenAI mode={mode!r} is not one of {self.MODES}")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: Any) -> None:  # quiet
        pass

    def _send(self, code: int, ctype: str, raw: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            return self._send(200, "application/json", json.dumps({"object": "list", "data": [
                {**self.fake.served, "created": int(time.time())}]}).encode())
        self._send(404, "application/json", b'{"detail": "Not Found"}')

    def do_POST(self) -> None:
        fake = self.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.endswith("/chat/completions"):
            return self._send(404, "application/json", b'{"detail": "Not Found"}')
        body = json.loads(raw or b"{}")
        with fake.lock:
            n = fake.chats
            fake.chats += 1
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            fake.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        try:
            delay = fake.delay(body) if callable(fake.delay) else fake.delay
            if delay:
                time.sleep(delay)
            code, ctype, out = fake.reply(n, body, self.headers.get("Authorization"))
        finally:
            with fake.lock:
                fake.in_flight -= 1
        self._send(code, ctype, out)
        if code == 200:
            with fake.lock:
                fake.answers += 1
                if fake.counter_file is not None:
                    fake.counter_file.write_text(str(fake.answers))


def user_text(body: dict) -> str:
    """The text of a chat request's last user turn (tests script replies by it)."""
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

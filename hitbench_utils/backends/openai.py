"""An OpenAI-compatible chat-completions server as a backend: ``model="openai:<name>"``.

Works with vLLM, SGLang, LMDeploy, ``transformers serve`` and hosted APIs (e.g. qwen3-vl-flash). Only
the standard library talks HTTP (urllib + threads), so nothing is added to the dependencies.

- **Requests.** Our chat messages are sent as they are, the ``{"type": "image"}`` placeholder becoming an
  ``image_url`` part holding a PNG data URL. Greedy runs send ``temperature: 0``; sampling runs add
  ``top_p`` and ``top_k`` (a field vLLM, SGLang and LMDeploy accept). A server that refuses one of these
  optional fields by name (HTTP 400/422, as ``transformers serve`` does for ``top_k``) gets the request
  again without it; the dropped field is logged once and listed in ``info["dropped_params"]``.
- **Concurrency.** One pool of ``concurrency`` threads per backend, shared by every ``generate`` and
  ``generate_stream`` call, so at most ``concurrency`` requests are ever in flight. ``generate`` returns
  results in order; ``generate_stream`` yields each (index, outcome) the moment it finishes, so a caller
  can log it at once (a kill then loses at most the ``concurrency`` requests in flight).
- **Retries** (transport: ``openai_http.py``). 429, 5xx, connection errors (refused, reset, server gone
  mid-request), timeouts and bodies that are not JSON (a proxy's HTML page, a reply cut short) are
  retried up to ``max_retries`` times with exponential backoff and jitter (``backoff_base`` · 2^n,
  capped at ``backoff_max``), honouring ``Retry-After``. Any other 4xx fails at once with the server's
  message. A request that runs out of retries raises ``SampleTimeout`` (status ``timeout``) when its
  last failure was a timeout, ``BadReply`` when it was an unreadable body, else ``OpenAIError`` (both
  status ``exception``): the engine makes each an error record. ``max_time_per_sample``
  (``GenSettings.max_time``) caps each request's wait too, and a request that passes it is a timeout at
  once, without retries (it would pass it again).
- **Replies** (``openai_reply.py``). ``content`` as a string or a list of text parts (joined) is the
  answer, so ``GenResult.text`` is always a ``str``; ``content`` null, no ``choices`` or an empty list
  raise ``BadReply``; a ``usage`` of the wrong type is ignored (the tokens are counted here instead).
- **Secrets.** The API key's value (and any secret of the environment, see ``redact.py``) is replaced by
  ``***`` in every text the backend returns or raises, and in what it logs, even when a server echoes
  the key back in an error body or in the answer itself.
- **Identity.** ``check()`` records the server's ``/models`` entry for the model (``id``, ``root``,
  ``owned_by``, ``max_model_len``...) in ``identity``; the fingerprint uses it, not the URL, so the same
  model at another address resumes (``served_identity`` gives the same without building a backend).
- **Failure isolation without redoing work.** When some requests of a batch fail, ``generate`` keeps
  every outcome (results and exceptions) in a small table keyed by (request key, messages, image size,
  settings) and raises; the engine then re-runs the batch one request at a time, and each of those
  calls is answered from the table, without a new HTTP request. So a success is never generated twice
  and a failure is not retried a second time. The table only holds outcomes no call has collected yet
  (bounded, oldest dropped first).
- **Token counts.** ``GenResult.output_tokens``/``input_tokens`` are the server's ``usage``
  (``completion_tokens``/``prompt_tokens``); ``extra`` also keeps the count made before sending.
  ``count_tokens`` (used for truncation) renders our Qwen3-VL chat template
  (``templates/qwen3vl_chat.jinja``) and counts it, in the first way available:

  1. ``local`` — ``tokenizer=`` a folder (AutoTokenizer) or ``'qwen2'`` (the shared Qwen2 BPE): exact;
  2. ``server`` — the server's ``/tokenize`` (vLLM, SGLang): exact for the text;
  3. ``estimated`` — neither: a pre-tokenizer that mimics Qwen2's BPE split (digits one token each,
     letter runs up to 5, punctuation runs up to 3, whitespace runs up to 64). On 300 RealHiTBench
     tables (60 per format) it counts 1.04–1.3× the real Qwen2 count (median), at worst 0.92×
     (csv full of non-ASCII symbols), so an estimated prompt can overshoot ``max_input_tokens`` by
     a few percent in rare cases. ``info["token_counts"]`` says which way is used.

  Image tokens are never asked of the server: Qwen's smart resize (sides rounded to multiples of
  patch·merge = 32 pixels, the area kept within [shortest_edge, longest_edge]) gives one token per
  32×32 pixels. The limits come from the local tokenizer folder's processor config when it has one,
  else Qwen3-VL's defaults (65,536 and 16,777,216 pixels: 64 to 16,384 tokens). That is exact for a
  server running Qwen3-VL with its default processor settings.
- **Truncation** needs a fast tokenizer for offsets: ``tokenizer`` is the local one, or else the
  estimating pre-tokenizer (a real ``tokenizers.Tokenizer``), so the table is cut at row boundaries
  the same way; with ``/tokenize`` the cut is then checked (and re-cut if needed) by the server's count.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
import time
import urllib.parse
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import BadReply, ConfigError, ModelLoadError, OpenAIError, SampleTimeout
from .base import Capabilities, GenRequest, GenResult, GenSettings
from .openai_http import PREFIX, Transport, _Refused, identity, identity_from_models, model_name
from .openai_reply import parse_reply

__all__ = ["OpenAIBackend", "OpenAIError", "BadReply", "BatchPartlyFailed", "from_config", "openai_identity",
           "model_name", "image_token_count", "estimating_tokenizer", "load_tokenizer", "smart_resize"]

log = logging.getLogger("hitbench")

QWEN3VL_IMAGE = {"patch_size": 16, "merge_size": 2, "min_pixels": 65_536, "max_pixels": 16_777_216}
OPTIONAL_PARAMS = ("top_k", "top_p", "seed")        # dropped (once, logged) when a server refuses them by name
_OUTCOME_CAP = 4096          # outcomes kept for a batch's one-by-one re-run...
_OUTCOME_TTL = 600.0         # ...and for at most this many seconds (the engine re-runs at once)

# Pieces of a Qwen2 pre-token that its BPE usually keeps as one token (see the module docstring).
_EST_PIECES = (r" ?-{1,16}| ?={1,16}"
               r"|[^\r\n\p{L}\p{N}]?[a-zA-Z\u00C0-\u024F]{1,5}|[a-zA-Z\u00C0-\u024F]{1,5}"
               r"|[^\r\n\p{L}\p{N}]?\p{L}|\p{L}|\p{N}|\s{1,64}|[^\s\p{L}\p{N}]{1,3}|.")


class BatchPartlyFailed(RuntimeError):
    """Some requests of a batch failed: the engine re-runs it one by one, answered from the kept outcomes."""


# ---- helpers that need no server ------------------------------------------------------------------
def openai_identity(model: str, base_url: str | None = None, tokenizer: str | None = None) -> dict:
    """The identity of a served model without contacting the server (``served`` unknown). ``base_url`` is
    accepted for old callers and ignored: the URL is not part of the identity (see ``served_identity``)."""
    return identity(model, None, tokenizer)


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = QWEN3VL_IMAGE["min_pixels"],
                 max_pixels: int = QWEN3VL_IMAGE["max_pixels"]) -> tuple[int, int]:
    """Qwen2-VL/Qwen3-VL's resize as (height, width); refuses what transformers' ``smart_resize`` refuses."""
    from ..images import smart_size

    if max(height, width) / max(1, min(height, width)) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    w, h = smart_size(width, height, min_pixels, max_pixels, factor)
    return h, w


def image_token_count(image: Any, cfg: dict | None = None) -> int:
    """Image tokens Qwen3-VL gives ``image`` (a PIL image or (width, height)): one per 32×32 pixels after resize."""
    c = {**QWEN3VL_IMAGE, **(cfg or {})}
    width, height = image if isinstance(image, tuple) else image.size
    factor = c["patch_size"] * c["merge_size"]
    h, w = smart_resize(height, width, factor, c["min_pixels"], c["max_pixels"])
    return (h // factor) * (w // factor)


def _image_config(folder: Path) -> dict:
    """patch/merge/min/max pixels from a model folder's processor files, when it has them."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        f = folder / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            continue
        d = d.get(key, {}) if key else d
        size, out = d.get("size") or {}, {}
        for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "merge_size")):
            if isinstance(d.get(theirs), int):
                out[ours] = d[theirs]
        lo, hi = size.get("shortest_edge", d.get("min_pixels")), size.get("longest_edge", d.get("max_pixels"))
        if isinstance(lo, int):
            out["min_pixels"] = lo
        if isinstance(hi, int):
            out["max_pixels"] = hi
        if out:
            return out
    return {}


def estimating_tokenizer():
    """A ``tokenizers.Tokenizer`` whose tokens approximate Qwen2's BPE without its vocabulary: every
    piece of the split is one token. It gives offsets, so truncation can cut with it."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    from ..tokenization import QWEN2_SPLIT, QWEN3VL_ADDED

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.Split(Regex(_EST_PIECES), behavior="isolated"),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in QWEN3VL_ADDED])
    return tok


def load_tokenizer(spec: str) -> tuple[Any, str, dict]:
    """(fast tokenizer, description, image config) for ``tokenizer='qwen2'`` or a local folder."""
    from ..tokenization import qwen_bpe_from_files, shared_tokenizer_dir

    if spec == "qwen2":
        d = shared_tokenizer_dir()
        if d is None:
            raise ConfigError("tokenizer", spec, "'qwen2' only where the shared Qwen2 BPE files are "
                              "($HITBENCH_SHARED/tokenizers/qwen2), or a local tokenizer folder",
                              "set HITBENCH_SHARED, pass a folder, or leave tokenizer out (estimated counts)")
        return qwen_bpe_from_files(d), f"qwen2 ({d})", {}
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ConfigError("tokenizer", spec, "'qwen2' or a local folder that AutoTokenizer loads")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise ConfigError("tokenizer", spec, "'qwen2' or a local folder that AutoTokenizer loads", str(e)) from e
    if not getattr(tok, "is_fast", False):
        raise ConfigError("tokenizer", spec, "a fast (tokenizer.json) tokenizer", "truncation needs token offsets")
    return tok, str(folder.resolve()), _image_config(folder)


def _chat_template():
    from importlib import resources

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    text = resources.files("hitbench_utils.templates").joinpath("qwen3vl_chat.jinja").read_text(encoding="utf-8")
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(text)



# ---- the backend --------------------------------------------------------------------------------
class OpenAIBackend:
    """``generate`` over ``{base_url}/chat/completions``; see the module docstring for the policies."""

    device = "remote"
    default_max_new_tokens = 1024
    capabilities = Capabilities(remote=True)

    def __init__(self, model: str, *, base_url: str | None, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, request_timeout: float = 600, max_retries: int = 5,
                 tokenizer: str | None = None, backoff_base: float = 1.0, backoff_max: float = 30.0,
                 check: bool = True) -> None:
        self.model = model_name(model if model.startswith(PREFIX) else PREFIX + model)
        if not base_url or not urllib.parse.urlsplit(base_url).scheme.startswith("http"):
            raise ConfigError("base_url", base_url, "the server's OpenAI-compatible URL, e.g. http://127.0.0.1:8000/v1")
        for name, v, ok in (("concurrency", concurrency, isinstance(concurrency, int) and concurrency >= 1),
                            ("max_retries", max_retries, isinstance(max_retries, int) and max_retries >= 0),
                            ("request_timeout", request_timeout, isinstance(request_timeout, (int, float)) and request_timeout > 0)):
            if not ok or isinstance(v, bool):
                raise ConfigError(name, v, "a positive number" if name == "request_timeout" else
                                  "an integer ≥ 1" if name == "concurrency" else "an integer ≥ 0")
        self.base_url = base_url.rstrip("/")
        self.api_key_env, self.concurrency = api_key_env, concurrency
        self.request_timeout, self.max_retries = float(request_timeout), max_retries
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self._tokenizer_spec = tokenizer
        self.identity = identity(PREFIX + self.model, None, tokenizer)    # check() adds what the server serves
        self.name = self.identity["path"]
        self._template = _chat_template()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._outcomes: OrderedDict[tuple, tuple[float, Any]] = OrderedDict()   # key -> (when, outcome)
        self._images: OrderedDict[int, tuple[Any, str]] = OrderedDict()
        self._dropped: set[str] = set()
        self.stats = {"requests": 0, "http_calls": 0, "retries": 0, "failed": 0, "in_flight": 0,
                      "max_in_flight": 0, "reused_outcomes": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._http = Transport(self.base_url, api_key_env=api_key_env, max_retries=max_retries,
                               backoff_base=backoff_base, backoff_max=backoff_max, stats=self.stats, lock=self._lock)
        self._tokenize_url: str | None = None
        if tokenizer:
            self.tokenizer, source, self._image_cfg = load_tokenizer(tokenizer)
            self.count_source = "local"
        else:
            self.tokenizer, source, self._image_cfg = estimating_tokenizer(), "estimating pre-tokenizer", {}
            self.count_source = "estimated"
        self.info = {"base_url": self.base_url, "model": self.model, "identity": self.identity,
                     "concurrency": concurrency, "request_timeout": self.request_timeout, "max_retries": max_retries,
                     "device": self.device, "dtype": "server", "token_counts": self.count_source, "tokenizer": source,
                     "image_tokens": {**QWEN3VL_IMAGE, **self._image_cfg}, "dropped_params": [], "stats": self.stats}
        if check:
            self.check()

    # ---- set-up ----------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return self.base_url + path

    def _call(self, method: str, url: str, body: dict | None, **kw: Any) -> Any:
        return self._http.call(method, url, body, **kw)

    def redact(self, obj: Any) -> Any:
        """``obj`` without the API key's value (nor any other secret of the environment)."""
        return self._http.redact(obj)

    def check(self) -> None:
        """Reach the server (with the retry policy: it may still be starting), see that it serves the model
        and record what it says it serves in ``identity``; without a local tokenizer look for a
        ``/tokenize`` endpoint. Raises ModelLoadError."""
        try:
            body = self._call("GET", self._url("/models"), None, timeout=min(self.request_timeout, 30.0))
        except _Refused as e:
            if e.status in (401, 403):
                raise ModelLoadError(f"{self.base_url} refused the key ({e.status}: {e}). Fix: put the API key in "
                                     f"${self.api_key_env}") from None
            log.warning("%s/models answered %s (%s); going on without checking the model name", self.base_url, e.status, e)
            body = None
        except (OpenAIError, SampleTimeout) as e:
            raise ModelLoadError(f"cannot reach {self.base_url}: {e}. Fix: start the server, or pass the right "
                                 "base_url (it usually ends in /v1)") from None
        entries = body.get("data") if isinstance(body, dict) else None
        names = [m.get("id") for m in entries if isinstance(m, dict)] if isinstance(entries, list) else []
        if names and self.model not in names:
            log.warning("%s does not list model %r (it lists %s); requests may fail", self.base_url, self.model,
                        self.redact(names[:10]))
        self.identity = identity(PREFIX + self.model, self.redact(identity_from_models(self.model, body)),
                                 self._tokenizer_spec)
        self.info["identity"] = self.identity
        if self.count_source == "estimated":
            self._find_tokenize()
        if self.count_source == "estimated":
            log.warning("model=openai:%s: no local tokenizer and no /tokenize endpoint, so token counts and truncation "
                        "use an estimate (see backends/openai.py); pass tokenizer='qwen2' or a tokenizer folder for "
                        "exact counts", self.model)

    def _find_tokenize(self) -> None:
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        for url in dict.fromkeys([root + "/tokenize", self.base_url + "/tokenize"]):
            try:
                out = self._call("POST", url, {"model": self.model, "prompt": "Hello world", "add_special_tokens": False},
                                 timeout=min(self.request_timeout, 30.0), retries=0)
            except Exception:  # noqa: BLE001 - no such endpoint: try the next, else estimate
                continue
            if isinstance(out, dict) and (isinstance(out.get("count"), int) or isinstance(out.get("tokens"), list)):
                self._tokenize_url, self.count_source = url, "server"
                self.info.update(token_counts="server", tokenizer=f"server {url}")
                return

    # ---- counting ----------------------------------------------------------------------------------
    def chat_text(self, messages: list[dict]) -> str:
        """The prompt as Qwen3-VL's chat template writes it (one ``<|image_pad|>`` per image)."""
        return self._template.render(messages=messages, add_generation_prompt=True)

    def image_tokens(self, image: Any) -> int:
        return image_token_count(image, self._image_cfg)

    def count_text(self, text: str) -> int:
        if self.count_source == "server":
            out = self._call("POST", self._tokenize_url, {"model": self.model, "prompt": text, "add_special_tokens": False},
                             timeout=self.request_timeout)
            count = out.get("count") if isinstance(out, dict) else None
            tokens = out.get("tokens") if isinstance(out, dict) else None
            if isinstance(count, int) and not isinstance(count, bool):
                return count
            if isinstance(tokens, list):
                return len(tokens)
            raise BadReply(f"{self._tokenize_url} sent no 'count' nor 'tokens'", self.redact(json.dumps(out))[:300])
        if self.count_source == "local":
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, messages: list[dict], image: Any = None) -> int:
        """Tokens of the chat-templated prompt, image tokens included (how: ``info["token_counts"]``)."""
        return self.count_text(self.chat_text(messages)) + (self.image_tokens(image) - 1 if image is not None else 0)

    # ---- generation --------------------------------------------------------------------------------
    def _data_url(self, image: Any) -> str:
        with self._lock:
            hit = self._images.get(id(image))
            if hit is not None and hit[0] is image:
                self._images.move_to_end(id(image))
                return hit[1]
        buf = io.BytesIO()
        (image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        with self._lock:   # keeps the image alive, so its id cannot be reused while cached
            self._images[id(image)] = (image, url)
            while len(self._images) > 8:
                self._images.popitem(last=False)
        return url

    def to_openai(self, messages: list[dict], image: Any = None) -> list[dict]:
        """Our messages in the OpenAI format, each image placeholder an ``image_url`` data URL."""
        out = []
        for m in messages:
            content = m["content"]
            if not isinstance(content, str):
                parts = []
                for item in content:
                    if item.get("type") == "image" or "image" in item:
                        img = item.get("image") if item.get("image") is not None else image
                        if img is None:
                            raise OpenAIError("the prompt has an image placeholder but the request carries no image")
                        parts.append({"type": "image_url", "image_url": {"url": self._data_url(img)}})
                    elif item.get("type") == "text":
                        parts.append({"type": "text", "text": item["text"]})
                content = parts
            out.append({"role": m["role"], "content": content})
        return out

    def request_body(self, req: GenRequest, settings: GenSettings) -> dict:
        max_new = min(settings.max_new_tokens, req.max_new_tokens or settings.max_new_tokens)
        body: dict[str, Any] = {"model": self.model, "messages": self.to_openai(req.messages, req.image),
                                "max_tokens": max_new, "temperature": 0.0 if settings.greedy else settings.temperature,
                                "seed": settings.seed, "stream": False}
        if not settings.greedy:
            body.update(top_p=settings.top_p, top_k=settings.top_k)
        for k in self._dropped:
            body.pop(k, None)
        return body

    def _post(self, body: dict, settings: GenSettings, note: dict) -> Any:
        """POST /chat/completions; a refused optional field (400/422 naming it) is dropped and asked again."""
        timeout, hard = self.request_timeout, False
        if settings.max_time and settings.max_time <= self.request_timeout:
            timeout, hard = float(settings.max_time), True
        while True:
            try:
                return self._call("POST", self._url("/chat/completions"), body, timeout=timeout,
                                  hard_deadline=hard, note=note)
            except _Refused as e:
                bad = [k for k in OPTIONAL_PARAMS if k in body and k in str(e) and e.status in (400, 422)]
                if not bad:
                    raise OpenAIError(f"{self.base_url} refused the request (HTTP {e.status}): {e}", e.status) from None
                for k in bad:
                    body.pop(k)
                with self._lock:
                    new = [k for k in bad if k not in self._dropped]
                    self._dropped.update(bad)
                    self.info["dropped_params"] = sorted(self._dropped)
                if new:
                    log.warning("%s refused %s (%s): sending requests without it", self.base_url, new, e)

    def _one(self, req: GenRequest, settings: GenSettings) -> GenResult:
        """One request → GenResult (its text always a str, redacted), or a SampleError (BadReply,
        OpenAIError, SampleTimeout) whose message is redacted."""
        body = self.request_body(req, settings)
        note: dict = {}
        with self._lock:
            self.stats["requests"] += 1
            self.stats["in_flight"] += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        t0 = time.perf_counter()
        try:
            out = self._post(body, settings, note)
            reply = parse_reply(self.redact(out), self.base_url)
        except Exception:
            with self._lock:
                self.stats["failed"] += 1
            raise
        finally:
            with self._lock:
                self.stats["in_flight"] -= 1
        dt = time.perf_counter() - t0
        completion, prompt = reply.completion_tokens, reply.prompt_tokens
        extra = {"prompt_tokens_server": prompt, "prompt_tokens_counted": req.input_tokens,
                 "token_counts": self.count_source, "finish_reason": reply.finish_reason,
                 "retries": note.get("retries", 0), "request_s": round(dt, 6)}
        if reply.ignored:
            extra["reply_fields_ignored"] = reply.ignored
        if completion is None:
            completion = self.count_text(reply.text)
            extra["completion_tokens_counted"] = True     # the server sent no usable usage
        with self._lock:
            self.stats["completion_tokens"] += completion
            self.stats["prompt_tokens"] += prompt or 0
        return GenResult(text=reply.text, output_tokens=completion, input_tokens=prompt, seconds=dt, extra=extra)

    @staticmethod
    def _outcome_key(req: GenRequest, settings: GenSettings) -> tuple:
        digest = hashlib.sha256(json.dumps(req.messages, sort_keys=True, default=str).encode()).hexdigest()
        size = tuple(req.image.size) if req.image is not None else None
        return (repr(req.key), digest, size, req.max_new_tokens, settings)

    def _submit(self, req: GenRequest, settings: GenSettings) -> Future:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="hitbench-openai")
            pool = self._pool
        return pool.submit(self._one, req, settings)

    def generate_stream(self, requests: Iterable[GenRequest], settings: GenSettings
                        ) -> Iterator[tuple[int, GenResult | BaseException]]:
        """Yield ``(index in requests, result or the exception it ended with)`` as each request finishes.

        At most ``concurrency`` requests of this stream are in flight (and at most ``concurrency`` across
        all callers, who share one pool); ``requests`` may be a lazy iterable, read one request ahead of
        each free slot, so work queued behind it can depend on what was yielded. Closing the generator
        early cancels what has not started."""
        it = iter(enumerate(requests))
        running: dict[Future, int] = {}
        try:
            while True:
                for i, req in it:
                    running[self._submit(req, settings)] = i
                    if len(running) >= self.concurrency:
                        break
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in sorted(done, key=running.get):
                    i = running.pop(f)
                    try:
                        outcome = f.result()
                    except Exception as e:  # noqa: BLE001 - an outcome, not a crash
                        outcome = e
                    yield i, outcome
        finally:
            for f in running:
                f.cancel()

    def generate(self, requests: list[GenRequest], settings: GenSettings) -> list[GenResult]:
        """The requests concurrently (``concurrency`` at most, across calls), results in order. If any
        fails: every outcome is kept and BatchPartlyFailed raised; a one-request call answers from them."""
        keys = [self._outcome_key(r, settings) for r in requests]
        outcomes: list[Any] = [None] * len(requests)
        todo = []
        with self._lock:
            while self._outcomes and next(iter(self._outcomes.values()))[0] < time.monotonic() - _OUTCOME_TTL:
                self._outcomes.popitem(last=False)
            for i, k in enumerate(keys):
                if k in self._outcomes:
                    outcomes[i] = self._outcomes.pop(k)[1]
                    self.stats["reused_outcomes"] += 1
                else:
                    todo.append(i)
        for j, outcome in self.generate_stream([requests[i] for i in todo], settings):
            outcomes[todo[j]] = outcome
        failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        if not failed:
            return outcomes
        if len(requests) == 1:
            raise outcomes[0]
        with self._lock:
            for k, o in zip(keys, outcomes):
                self._outcomes[k] = (time.monotonic(), o)
                self._outcomes.move_to_end(k)
            while len(self._outcomes) > _OUTCOME_CAP:
                self._outcomes.popitem(last=False)
        raise BatchPartlyFailed(f"{len(failed)} of {len(requests)} requests failed "
                                f"(keys {[requests[i].key for i in failed][:20]}); each is recorded on its own")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001
            pass


def from_config(cfg: Any) -> OpenAIBackend:
    """The backend for a RunConfig with ``model='openai:<name>'``."""
    return OpenAIBackend(cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                         request_timeout=cfg.request_timeout, max_retries=cfg.max_retries, tokenizer=cfg.tokenizer)

"""Reading a chat-completions reply, whatever shape a server gives it.

Servers differ, and some replies are not answers at all. :func:`parse_reply` turns a decoded body into a
:class:`Reply` whose ``text`` is always a ``str``, or raises :class:`~hitbench_utils.errors.BadReply`
(an error record with status ``exception``) that names what came instead. It never raises anything else.

- ``content`` a string: the answer. A list of parts (``[{"type": "text", "text": ...}, ...]``, as the
  newer OpenAI API and some servers send): the text parts joined, other parts (images, audio) ignored.
  A single part as a dict counts as a list of one.
- ``content`` null, or a list with no text part: BadReply. Such a reply usually spent its tokens
  elsewhere (``reasoning_content``, ``tool_calls``, a ``refusal``), which the error names.
- No ``choices``, an empty list, a choice or message that is not an object, a body that is not an
  object, or a body holding an ``error``: BadReply.
- ``usage`` that is not an object, or token counts that are not non-negative integers: ignored (the
  backend counts the answer's tokens itself) and listed in ``Reply.ignored``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadReply

TEXT_PART_TYPES = ("text", "output_text")


@dataclass
class Reply:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ignored: list[str] = field(default_factory=list)     # fields of the reply that had the wrong type


def _show(value: Any, n: int = 300) -> str:
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= n else text[:n] + f"... ({len(text):,} chars)"


def _count(usage: dict, name: str, ignored: list[str]) -> int | None:
    v = usage.get(name)
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    ignored.append(f"usage.{name}={_show(v, 40)}")
    return None


def content_text(content: Any) -> str | None:
    """The answer in ``content``: a string as it is, text parts joined; None when there is no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
    return "".join(texts) if texts else None


def parse_reply(body: Any, where: str = "the server") -> Reply:
    """A chat-completions body → Reply, or BadReply naming what is wrong (see the module docstring)."""
    if not isinstance(body, dict):
        raise BadReply(f"{where} sent a reply that is not a JSON object", _show(body))
    if body.get("error") is not None and not body.get("choices"):
        err = body["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        raise BadReply(f"{where} answered with an error", _show(msg))
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        what = "no 'choices'" if choices is None else f"'choices' is {_show(choices, 60)}"
        raise BadReply(f"{where} sent {what}, so no answer", "reply: " + _show(body))
    choice = choices[0]
    if not isinstance(choice, dict):
        raise BadReply(f"{where} sent a choice that is not an object", _show(choice))
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    message = choice.get("message")
    if message is None and isinstance(choice.get("text"), str):        # a completions-style choice
        message = {"content": choice["text"]}
    if not isinstance(message, dict):
        raise BadReply(f"{where} sent a choice without a message object", _show(choice))
    text = content_text(message.get("content"))
    if text is None:
        content = message.get("content")
        why = "null" if content is None else f"without text ({_show(content, 120)})"
        spent = [k for k in ("reasoning_content", "reasoning", "tool_calls", "refusal") if message.get(k)]
        detail = f"finish_reason={finish!r}" + (f", the tokens went to {', '.join(spent)}" if spent else "")
        if message.get("refusal"):
            detail += f": {_show(message['refusal'], 200)}"
        raise BadReply(f"{where} sent content {why}", detail)
    ignored: list[str] = []
    usage = body.get("usage")
    if usage is not None and not isinstance(usage, dict):
        ignored.append(f"usage={_show(usage, 60)}")
        usage = None
    usage = usage or {}
    return Reply(text, finish, _count(usage, "prompt_tokens", ignored), _count(usage, "completion_tokens", ignored),
                 ignored)

"""Any local Qwen3-VL folder through AutoProcessor + AutoModelForImageTextToText (the tiny model too).

The attention implementation is checked after loading: if the model did not get the one asked for,
that is an error, never a silent fallback (the seed's image OOMs came from a silent fall back to eager).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelLoadError
from .base import Capabilities, GenRequest, GenResult, GenSettings

from ..config import ATTN, DTYPES


def model_identity(path: str | Path) -> dict:
    """What identifies a model folder for the fingerprint, without loading it."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"model={str(path)!r} is not a model folder: it has no config.json. Fix: pass a local "
                             "Qwen3-VL folder (one that from_pretrained accepts) or model='tiny'")
    try:
        parsed = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"model={str(path)!r}: its config.json is not valid JSON ({e}). Fix: re-download the "
                             "checkpoint or pass model='tiny'") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelLoadError(f"model={str(path)!r}: its config.json has no model_type, so it is not a transformers "
                             "model. Fix: re-download the checkpoint or pass model='tiny'")
    ident = {"path": str(p.resolve()), "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]}
    tiny = p / "hitbench_tiny.json"
    if tiny.is_file():
        ident["tiny"] = json.loads(tiny.read_text())
        ident["path"] = "tiny"
    return ident


def _get(size: Any, key: str) -> int | None:
    v = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(v) if v else None


def resolve_device(device: str) -> str:
    import torch

    if device in ("auto", "", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", device, "cpu, or cuda[:N] on a machine with a GPU", "pass device='cpu' or 'auto'")
    return device


class _ForceEOS:
    """Ends row i with EOS after caps[i] new tokens: per-request output lengths (scripted benchmarks),
    so a batch finishes the way it would with the real model's answers."""

    def __init__(self, caps: list[int], prompt_len: int, eos: int) -> None:
        self.caps, self.prompt_len, self.eos = caps, prompt_len, eos

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        n = input_ids.shape[1] - self.prompt_len
        for i, cap in enumerate(self.caps):
            if n >= cap:
                scores[i, :] = float("-inf")
                scores[i, self.eos] = 0.0
        return scores


class HFBackend:
    """Batched ``generate`` over a local checkpoint, left-padded, greedy by default."""

    capabilities = Capabilities(shared_prefix=True)

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", attn_implementation: str = "sdpa",
                 device: str = "auto") -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype not in DTYPES:
            raise ConfigError("dtype", dtype, ", ".join(DTYPES))
        if attn_implementation not in ATTN:
            raise ConfigError("attn_implementation", attn_implementation, ", ".join(ATTN))
        self.identity = model_identity(model_path)
        self.device = resolve_device(device)
        torch_dtype = (torch.bfloat16 if self.device.startswith("cuda") else torch.float32) if dtype == "auto" else getattr(torch, dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(model_path)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model_path, dtype=torch_dtype, attn_implementation=attn_implementation).to(self.device).eval()
        except (ImportError, ValueError) as e:
            if "attn" in str(e).lower() or "flash" in str(e).lower():
                raise ModelLoadError(f"attn_implementation={attn_implementation!r} could not be loaded: {e}. Fix: install "
                                     "its kernels or pass attn_implementation='sdpa'") from e
            raise ModelLoadError(f"model={str(model_path)!r} could not be loaded: {e}") from e
        except (OSError, KeyError, TypeError) as e:
            raise ModelLoadError(f"model={str(model_path)!r} could not be loaded: {e}. Fix: pass a folder holding a "
                                 "Qwen3-VL checkpoint (config.json, weights, processor files) or model='tiny'") from e
        self._setup(attn_implementation, str(torch_dtype).replace("torch.", ""))

    @classmethod
    def from_model(cls, model: Any, processor: Any, *, identity: dict, attn_implementation: str = "sdpa") -> "HFBackend":
        """Wrap a model built in memory (benchmarks build the 8B architecture with random weights)."""
        self = cls.__new__(cls)
        self.identity, self.model, self.processor = identity, model.eval(), processor
        self.device = str(next(model.parameters()).device)
        self._setup(attn_implementation, str(next(model.parameters()).dtype).replace("torch.", ""))
        return self

    def _setup(self, attn_implementation: str, dtype: str) -> None:
        got = self.model.config._attn_implementation
        if got != attn_implementation:
            raise ModelLoadError(f"asked for attn_implementation={attn_implementation!r} but the model loaded {got!r}; "
                                 "refusing to fall back silently")
        vision_attn = getattr(getattr(self.model.config, "vision_config", None), "_attn_implementation", got)
        if vision_attn not in (None, got):
            raise ModelLoadError(f"the vision tower loaded attn_implementation={vision_attn!r}, not {got!r}")
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else self.tokenizer.pad_token_id
        self.default_max_new_tokens = 32 if "tiny" in self.identity else 1024
        self.name = self.identity["path"]
        self.info = {"model": self.identity, "device": self.device, "dtype": dtype, "attn_implementation": got}

    # -- prompts --------------------------------------------------------------------------------
    def chat_text(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def image_tokens(self, image: Any) -> int:
        """Tokens the processor will give this image: its smart resize within the processor's own pixel
        budget, then one token per 32×32 pixels (checked against transformers' smart_resize)."""
        from ..images import image_tokens, smart_size

        size = getattr(self.processor.image_processor, "size", None) or {}
        lo, hi = _get(size, "shortest_edge"), _get(size, "longest_edge")
        return image_tokens(*smart_size(image.width, image.height, lo, hi))

    def count_tokens(self, messages: list[dict], image: Any = None) -> int:
        """Exact length of the chat-templated prompt, image tokens included."""
        n = len(self.tokenizer(self.chat_text(messages), add_special_tokens=False)["input_ids"])
        return n + (self.image_tokens(image) - 1 if image is not None else 0)

    # -- generation ----------------------------------------------------------------------------
    def admit(self, requests: list[GenRequest]) -> None:
        """Every request is accepted (see ``Backend.admit``)."""

    def generate(self, requests: list[GenRequest], settings: GenSettings) -> list[GenResult]:
        import torch

        texts = [self.chat_text(r.messages) for r in requests]
        images = [r.image for r in requests if r.image is not None]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(self.device)
        kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=sorted(self.eos_ids))
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
            torch.manual_seed(settings.seed)
        if settings.max_time:
            kwargs["max_time"] = float(settings.max_time)
        caps = [r.max_new_tokens for r in requests]
        if any(caps):
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([_ForceEOS(
                [c or settings.max_new_tokens for c in caps], inputs["input_ids"].shape[1], min(self.eos_ids))])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        dt = time.perf_counter() - t0
        prompt_len = inputs["input_ids"].shape[1]
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for i, row in enumerate(out[:, prompt_len:].tolist()):
            n = next((k for k, t in enumerate(row) if t in self.eos_ids), len(row))
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            timed_out = bool(settings.max_time and dt >= settings.max_time and n == len(row) < settings.max_new_tokens)
            results.append(GenResult(text=text, output_tokens=n, input_tokens=int(lengths[i]), seconds=dt,
                                     timed_out=timed_out))
        return results

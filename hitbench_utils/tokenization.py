"""Qwen2-family BPE tokenizers, built without a hub download.

Two sources: the real vocab/merges (exact token counts for truncation and benchmarks), or a small
BPE trained on the fly (the tiny test model on a machine with no shared files). Both get the
Qwen3-VL special tokens, so prompts, chat templates and the processor behave as with the real model.

transformers 5.x silently builds an EMPTY vocabulary from ``Qwen2TokenizerFast(vocab_file=...,
merges_file=...)``; we build the ``tokenizers`` object ourselves and check a known encoding.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

# The Qwen2 pre-tokenizer split (same regex as Qwen2/Qwen3 tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3-VL added tokens, in id order after the 151,643 BPE tokens. (token, special?)
QWEN3VL_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
QWEN2_BPE_SIZE = 151_643
HELLO_WORLD_IDS = [9707, 1879]


def _empty_bpe_tokenizer(vocab: dict[str, int] | None = None, merges: list | None = None):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = models.BPE(vocab=vocab, merges=merges, byte_fallback=False) if vocab is not None else models.BPE()
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_specials(tok) -> None:
    from tokenizers import AddedToken

    for text, special in QWEN3VL_ADDED:
        added = AddedToken(text, special=special, normalized=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])


def _wrap(tok):
    """A transformers fast tokenizer with Qwen's special-token roles set."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, clean_up_tokenization_spaces=False,
        model_max_length=10_000_000, padding_side="left",
    )
    return fast


def qwen_bpe_from_files(directory: str | os.PathLike):
    """Exact Qwen2-family tokenizer from vocab.json + merges.txt (checked: 'Hello world' → [9707, 1879])."""
    d = Path(directory)
    vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
    if not vocab_path.is_file() or not merges_path.is_file():
        raise ConfigError("tokenizer_dir", str(d), "a folder with vocab.json and merges.txt",
                          "point it at a Qwen2-family tokenizer folder")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    merges = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    tok = _empty_bpe_tokenizer(vocab, merges)
    _add_specials(tok)
    ids = tok.encode("Hello world", add_special_tokens=False).ids
    if len(vocab) == QWEN2_BPE_SIZE and ids != HELLO_WORLD_IDS:
        raise ConfigError("tokenizer_dir", str(d), f"a tokenizer encoding 'Hello world' as {HELLO_WORLD_IDS}",
                          f"got {ids}; the vocab/merges files do not match Qwen2's")
    if tok.token_to_id("<|image_pad|>") != 151655 and len(vocab) == QWEN2_BPE_SIZE:
        raise AssertionError("special token ids do not follow the Qwen3-VL layout")
    return _wrap(tok)


def train_tiny_bpe(texts: Iterable[str], vocab_size: int = 3000):
    """A small Qwen-style byte-level BPE trained on ``texts``: the tiny model's tokenizer when no real one exists."""
    from tokenizers import pre_tokenizers, trainers

    tok = _empty_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _add_specials(tok)
    return _wrap(tok)


def shared_tokenizer_dir() -> Path | None:
    """The Qwen2 BPE folder under $HITBENCH_SHARED (default ../shared), if present."""
    root = Path(os.environ.get("HITBENCH_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    d = root / "tokenizers" / "qwen2"
    return d if (d / "vocab.json").is_file() and (d / "merges.txt").is_file() else None

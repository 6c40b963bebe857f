"""A tiny random Qwen3-VL that the project builds itself, so the demo and the tests run on a CPU.

It is a real ``Qwen3VLForConditionalGeneration`` with a real processor, saved to a folder and loaded
back through the same ``hf`` backend path as a real checkpoint: only the weights are random. The
tokenizer is the real Qwen2 BPE when the shared files are present, otherwise a small BPE trained on
the fly. Random weights never emit EOS on purpose, so its generation config caps new tokens at 32.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from importlib import resources
from pathlib import Path

TINY_VERSION = "2"
TINY_MAX_NEW_TOKENS = 32


def cache_root() -> Path:
    return Path(os.environ.get("HITBENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hitbench")


def chat_template() -> str:
    return resources.files("hitbench_utils.templates").joinpath("qwen3vl_chat.jinja").read_text(encoding="utf-8")


def _corpus(seed: int = 0) -> list[str]:
    """Table-like text in all five formats, to train the fallback tokenizer (deterministic)."""
    rng = random.Random(seed)
    words = ("total year region sales employed population rate percent annual average number north south "
             "east west quarter revenue growth share count school students budget income tax the of and "
             "in to for a is what which how many question answer final table row column header value").split()
    out = [resources.files("hitbench_utils.templates").joinpath("prompts_default.json").read_text(encoding="utf-8")]
    for _ in range(400):
        cells = [rng.choice(words).title() if rng.random() < 0.4 else f"{rng.randint(0, 99999)}" for _ in range(6)]
        num = f"{rng.randint(0, 999)}.{rng.randint(0, 99)}"
        out += ["<tr><td class=\"s\">" + "</td><td>".join(cells) + "</td></tr>",
                " & ".join(cells) + " \\\\", ",".join(f'"{c}"' for c in cells), "| " + " | ".join(cells) + " |",
                json.dumps({c: num for c in cells[:3]}), " ".join(rng.choice(words) for _ in range(12)) + "?"]
    return out


def _tokenizer_source() -> tuple[str, Path | None]:
    from ..tokenization import shared_tokenizer_dir

    d = shared_tokenizer_dir()
    if d is None:
        return "trained", None
    digest = hashlib.sha256((d / "vocab.json").read_bytes() + (d / "merges.txt").read_bytes()).hexdigest()[:10]
    return f"qwen2bpe-{digest}", d


def tiny_model_dir(dest: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the folder of the tiny model; safe against concurrent builders."""
    source, tok_dir = _tokenizer_source()
    folder = Path(dest) if dest else cache_root() / f"tiny-qwen3vl-v{TINY_VERSION}-{source}"
    if (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        _build(tmp, tok_dir, source)
        (tmp / ".complete").write_text(source)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: theirs is as good as ours
            if not (folder / ".complete").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_processor(tokenizer):
    """A Qwen3-VL processor around ``tokenizer``: patch 16, merge 2 (one image token per 32×32 pixels),
    and Qwen3-VL's default pixel budget of 65,536–16,777,216 pixels."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer.chat_template = chat_template()
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                              size={"shortest_edge": 65_536, "longest_edge": 16_777_216}),
        tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(), chat_template=chat_template(),
    )


def _build(out: Path, tok_dir: Path | None, source: str) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from ..tokenization import qwen_bpe_from_files, train_tiny_bpe

    tokenizer = qwen_bpe_from_files(tok_dir) if tok_dir else train_tiny_bpe(_corpus(), vocab_size=3000)
    processor = build_processor(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1_048_576,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                             "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            tie_word_embeddings=False, pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=256, deepstack_visual_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        max_new_tokens=TINY_MAX_NEW_TOKENS, do_sample=False,
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], pad_token_id=ids("<|endoftext|>"),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "hitbench_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "tokenizer": source}))

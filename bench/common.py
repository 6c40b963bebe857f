"""Shared pieces of the GPU benchmarks: the 8B Qwen3-VL architecture with random weights, and the
inputs a GPU job needs (the GPU machine sees only the repository checkout, so ``prepare`` copies
what it needs from $HITBENCH_SHARED into the git-ignored ``.device/`` folder, which is sent along)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INPUTS = REPO / ".device"

TEXT_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
               rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True},
               tie_word_embeddings=False, pad_token_id=151643)
VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                 patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                 deepstack_visual_indexes=[8, 16, 24])


def build_random_8b(tokenizer_dir: str | os.PathLike, *, device: str = "cuda", attn: str = "sdpa", seed: int = 0):
    """(backend, seconds): the real 8B architecture, random bf16 weights, the real Qwen BPE."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from hitbench_utils.backends.hf import HFBackend
    from hitbench_utils.backends.tiny import build_processor
    from hitbench_utils.tokenization import qwen_bpe_from_files

    t0 = time.time()
    processor = build_processor(qwen_bpe_from_files(tokenizer_dir))
    config = Qwen3VLConfig(text_config=TEXT_8B, vision_config=VISION_8B, image_token_id=151655,
                           video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                           tie_word_embeddings=False)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False)
    n = sum(p.numel() for p in model.parameters())
    backend = HFBackend.from_model(model, processor, identity={"path": "random-qwen3vl-8b", "params": n, "seed": seed},
                                   attn_implementation=attn)
    return backend, time.time() - t0


def shared_dir() -> Path:
    """$HITBENCH_SHARED, or the ``shared`` folder beside the checkout."""
    return Path(os.environ.get("HITBENCH_SHARED") or REPO.parent / "shared")


def realhitbench_dir(shared: str | os.PathLike | None = None) -> Path:
    """The unpacked RealHiTBench folder that the shared ``bin/realhitbench`` prints."""
    shared = Path(shared) if shared else shared_dir()
    return Path(subprocess.run([str(shared / "bin" / "realhitbench")], capture_output=True, text=True,
                               check=True).stdout.strip())


def prepare(shared: str | os.PathLike | None = None, *, files: dict[str, list[str]] | None = None,
            qa: dict[str, list[dict]] | None = None, extra: dict[str, object] | None = None,
            root: Path = INPUTS) -> Path:
    """Copy the tokenizer and the named table files into .device/ (git-ignored), to send with the GPU job;
    tables, question files and ``extra`` go under ``root`` (a benchmark's own subset folder)."""
    shared = Path(shared) if shared else shared_dir()
    data = realhitbench_dir(shared)
    tok = INPUTS / "qwen2"
    tok.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(shared / "tokenizers" / "qwen2" / name, tok / name)
    for fmt, names in (files or {}).items():
        (root / "data" / fmt).mkdir(parents=True, exist_ok=True)
        for n in names:
            src = data / fmt / n
            if src.is_file():
                shutil.copy2(src, root / "data" / fmt / n)
    for name, items in (qa or {}).items():
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / name).write_text(json.dumps({"queries": items}))
    for name, obj in (extra or {}).items():
        (root / name).write_text(json.dumps(obj))
    return root


def gpu_memory() -> dict:
    import torch

    return {"allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"

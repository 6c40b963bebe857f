"""Shared fixtures: the shared files (skip when absent), the sample dataset, the tiny model."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("HITBENCH_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_root()
    if not (root / "data" / "realhitbench.tar.xz").is_file():
        pytest.skip(f"shared files absent: no {root}/data/realhitbench.tar.xz (set HITBENCH_SHARED to the shared folder)")
    return root


@pytest.fixture(scope="session")
def real_data(shared: Path) -> Path:
    out = subprocess.run([str(shared / "bin" / "realhitbench")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def qwen_tokenizer(shared: Path):
    d = shared / "tokenizers" / "qwen2"
    if not (d / "vocab.json").is_file():
        pytest.skip(f"shared Qwen2 tokenizer absent: no {d}/vocab.json")
    from hitbench_utils.tokenization import qwen_bpe_from_files

    return qwen_bpe_from_files(d)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    from hitbench_utils.sample_data import ensure_sample_dataset

    return ensure_sample_dataset(tmp_path_factory.mktemp("sample") / "data")


@pytest.fixture(scope="session")
def tiny_backend():
    from hitbench_utils.backends.hf import HFBackend
    from hitbench_utils.backends.tiny import tiny_model_dir

    return HFBackend(tiny_model_dir(), dtype="float32", attn_implementation="sdpa", device="cpu")

"""The hf backend refuses silent fallbacks and non-models; the tiny model is a real Qwen3-VL."""
import json

import pytest

from hitbench_utils.backends.hf import HFBackend, model_identity
from hitbench_utils.backends.tiny import tiny_model_dir
from hitbench_utils.errors import ModelLoadError


def test_an_attention_that_cannot_load_is_an_error_not_a_fallback():
    with pytest.raises(ModelLoadError, match="flash_attention_2"):
        HFBackend(tiny_model_dir(), attn_implementation="flash_attention_2", device="cpu")


def test_the_loaded_attention_is_recorded_for_both_towers(tiny_backend):
    assert tiny_backend.info["attn_implementation"] == "sdpa"
    assert tiny_backend.model.config.vision_config._attn_implementation == "sdpa"


def test_tiny_model_is_a_real_qwen3vl_folder_loaded_through_the_hf_path():
    d = tiny_model_dir()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert (d / "processor_config.json").exists() and (d / "tokenizer.json").exists()
    assert model_identity(d)["path"] == "tiny"


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        model_identity(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        model_identity(tmp_path)

"""ModelConfig: reading config.json in both formats, and the named presets.

Hub files are mostly in the transformers-4 format (top-level rope_theta / rope_scaling,
torch_dtype; Gemma 3 rope_local_base_freq and a sliding-window pattern instead of
layer_types); transformers 5 writes rope_parameters (per layer type for Gemma 3) and
layer_types. The 4-format dicts below are written by hand from the real files on the Hub;
their 5-format twins are what transformers 5 writes when it re-saves them. Both must give
the same ModelConfig, equal to the preset of that model. A missing rope base is an error.
"""
import json
from dataclasses import asdict

import pytest
import torch

from conftest import real_checkpoint
from load_weights import config_from_hf, resolve
from model import PRESETS, Model, ModelConfig

# config.json of three Hub models, transformers-4 format, as published (abridged to what we read)
HUB_V4 = {
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "hidden_act": "silu",
        "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    "gemma-2-2b": {
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "vocab_size": 256000,
        "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "sliding_window": 4096, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "cache_implementation": "hybrid",
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32"},
    "gemma-3-1b": {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144,
        "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None, "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh",
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16"},
}
# Not architecture: where the weights live, what ends a generation (a generation_config.json
# matter), and the routing added later.
NOT_ARCHITECTURE = ("hf_repo", "eos_ids", "route", "kv")


def architecture(cfg: ModelConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_ARCHITECTURE}


def resaved_by_transformers5(hf_v4: dict) -> dict:
    """The config.json transformers 5 writes after reading hf_v4."""
    from transformers import AutoConfig
    fields = {k: v for k, v in hf_v4.items() if k != "model_type"}
    return json.loads(AutoConfig.for_model(hf_v4["model_type"], **fields).to_json_string())


# ----------------------------------------------------------------------------------------------
# The two formats
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", HUB_V4)
def test_transformers4_config_matches_preset(name):
    cfg = config_from_hf(HUB_V4[name])
    assert architecture(cfg) == architecture(ModelConfig(**PRESETS[name]))


@pytest.mark.parametrize("name", HUB_V4)
def test_transformers5_config_reads_the_same(name):
    v5 = resaved_by_transformers5(HUB_V4[name])
    assert "rope_theta" not in v5 and "rope_scaling" not in v5 and "rope_parameters" in v5
    assert "torch_dtype" not in v5 and "dtype" in v5
    if v5["model_type"] != "llama":
        assert "layer_types" in v5               # Gemma 2/3: the pattern spelled out per layer
    if v5["model_type"] == "gemma3_text":
        assert set(v5["rope_parameters"]) == {"full_attention", "sliding_attention"}
    assert config_from_hf(v5) == config_from_hf(HUB_V4[name])


def test_gemma3_rope_bases_and_scaling():
    """Gemma 3 4B+: linear scaling on global layers; sliding layers keep their own base, unscaled."""
    v4 = dict(HUB_V4["gemma-3-1b"], rope_scaling={"factor": 8.0, "rope_type": "linear"})
    expected = dict(rope_theta=1e6, rope_local_theta=1e4, rope_scaling=dict(type="linear", factor=8.0))
    for hf in (v4, resaved_by_transformers5(v4)):
        cfg = config_from_hf(hf)
        assert {k: getattr(cfg, k) for k in expected} == expected


TINY_GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
               "max_position_embeddings": 64, "query_pre_attn_scalar": 16, "sliding_window": 8,
               "rope_theta": 1e6, "rope_local_base_freq": 1e4}


@pytest.mark.parametrize("key", ["sliding_window_pattern", "_sliding_window_pattern"])
def test_gemma3_sliding_window_pattern_spellings(key):
    """Every pattern-th layer is global; both spellings of the field are read, not defaulted."""
    cfg = config_from_hf(dict(TINY_GEMMA3, **{key: 3}))
    assert cfg.layer_types == ("sliding", "sliding", "full") * 2


def test_layer_types_win_over_pattern():
    layer_types = ["full_attention", "sliding_attention"] * 3
    cfg = config_from_hf(dict(TINY_GEMMA3, sliding_window_pattern=6, layer_types=layer_types))
    assert cfg.layer_types == ("full", "sliding") * 3


# ----------------------------------------------------------------------------------------------
# Missing fields are errors, not defaults
# ----------------------------------------------------------------------------------------------

def test_missing_rope_theta_is_an_error():
    v4 = {k: v for k, v in HUB_V4["llama-3.2-1b"].items() if k != "rope_theta"}
    with pytest.raises(ValueError, match="rope_theta"):
        config_from_hf(v4)
    v5 = resaved_by_transformers5(HUB_V4["llama-3.2-1b"])
    del v5["rope_parameters"]["rope_theta"]
    with pytest.raises(ValueError, match="rope_theta"):
        config_from_hf(v5)


def test_missing_gemma3_local_rope_base_is_an_error():
    # transformers would use 10000 here; falling back to the global 1e6 gives wrong positions silently
    hf = {k: v for k, v in TINY_GEMMA3.items() if k != "rope_local_base_freq"}
    with pytest.raises(ValueError, match="rope_local_base_freq"):
        config_from_hf(hf)


def test_unsupported_model_type_is_an_error():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        config_from_hf({"model_type": "gpt2"})


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

PARAMETERS = {  # parameter counts of the official checkpoints
    "gemma-2b": 2_506_172_416, "gemma-7b": 8_537_680_896, "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984, "gemma-3-270m": 268_098_176, "gemma-3-1b": 999_885_952,
    "llama-2-7b": 6_738_415_616, "llama-3.1-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824, "smollm2-135m": 134_515_008, "smollm2-135m-instruct": 134_515_008,
    "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384, "tinyllama-1.1b": 1_100_048_384,
}


def test_every_preset_has_a_known_size():
    assert set(PRESETS) == set(PARAMETERS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds(name):
    cfg = ModelConfig(**PRESETS[name])
    assert cfg.hf_repo
    with torch.device("meta"):                     # shapes only, no memory
        model = Model(cfg)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown model 'llama-9': pass a folder or one of the presets .*smollm2-135m"):
        resolve("llama-9")


@pytest.mark.real
@pytest.mark.parametrize("preset", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_preset_matches_real_checkpoint(preset):
    path = real_checkpoint(preset) / "config.json"
    cfg = config_from_hf(json.loads(path.read_text()))
    assert architecture(cfg) == architecture(ModelConfig(**PRESETS[preset]))

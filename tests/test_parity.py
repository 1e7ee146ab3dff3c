"""Numerical parity with Hugging Face transformers, the reference implementation.

For every supported model_type, a tiny random transformers model is saved as a model folder,
loaded with load_weights.load_model, and its logits compared with the reference's (float32,
CPU, eager attention). The configs are chosen so every family difference bites:
sequences longer than the sliding window, soft-caps that change the logits without
saturating them, GQA and MQA, llama3 rope scaling, Gemma 3's layer_types and two rope
bases, qkv biases, an untied head, and a head_dim unlike width / heads. Two tests break
our model on purpose (sliding window off by one, soft-cap removed) to show the parity
test would notice. Also: rope tables against transformers' own, and KV-cached greedy
decoding against full recomputation.
"""
import pytest
import torch
from torch.testing import assert_close

from load_weights import config_from_hf, load_model
from model import Model, attention_mask, rope_cos_sin, rope_inv_freq

SEQ = 24       # longer than the sliding window of 8 below
WINDOW = 8

FAMILIES = {
    # GQA (4 query heads, 2 KV heads), untied head, llama3 scaling whose three frequency
    # bands (kept, blended, divided) all occur at head_dim 16 with an original context of 32.
    "llama": dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(num_key_value_heads=1),                       # MQA; q/k/v biases
    "gemma": dict(head_dim=24, num_key_value_heads=1),           # MQA; head_dim != 64 / 4
    # soft-caps small enough to matter (raw logits reach ~20), not so small that all saturate
    "gemma2": dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=12,
                   attn_logit_softcapping=5.0, final_logit_softcapping=10.0),
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=12,
                        layer_types=["sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e6),
                                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
}
TOL = dict(rtol=1e-4, atol=1e-4)   # logits are O(10); float32 reordering gives ~1e-5


def tokens(batch, length, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_logits(ref, idx):
    return ref(idx).logits


# ----------------------------------------------------------------------------------------------
# Logits
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_match_transformers(tiny_hf, model_type):
    ref, folder = tiny_hf(model_type, **FAMILIES[model_type])
    model = load_model(folder)
    idx = tokens(2, SEQ)
    expected = reference_logits(ref, idx)
    with torch.no_grad():
        compacted, _ = model(idx)                # the inference path
        masked, _ = model(idx, masked=True)      # the training path
    assert_close(compacted, expected, **TOL)
    assert_close(masked, expected, **TOL)


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
@pytest.mark.parametrize("shift", [-1, +1])
def test_sliding_window_off_by_one_is_caught(tiny_hf, model_type, shift):
    """A window one token too short or too long must break parity."""
    ref, folder = tiny_hf(model_type, **FAMILIES[model_type])
    model = load_model(folder)
    for block in model.layers:
        if block.attn.window is not None:
            block.attn.window += shift
    idx = tokens(2, SEQ)
    with torch.no_grad():
        logits, _ = model(idx)
    assert (logits - reference_logits(ref, idx)).abs().max() > 1e-2


def test_sliding_window_mask_matches_transformers():
    """A query at position p sees keys p - window + 1 .. p: `window` tokens, itself included."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    hf_visible = sliding_window_causal_mask_function(WINDOW)
    pos = torch.arange(20)[None]                                   # (1, T)
    ours = attention_mask(pos, pos, WINDOW)[0, 0]                  # (T, T)
    expected = hf_visible(0, 0, torch.arange(20)[:, None], torch.arange(20)[None, :])    # (T, T)
    assert torch.equal(ours, expected)
    assert int(ours[15].sum()) == WINDOW


@pytest.mark.parametrize("softcap", ["attention", "final"])
def test_gemma2_without_softcap_differs(tiny_hf, softcap):
    """Dropping either Gemma 2 soft-cap must break parity: the caps in FAMILIES bite."""
    ref, folder = tiny_hf("gemma2", **FAMILIES["gemma2"])
    model = load_model(folder)
    if softcap == "attention":
        for block in model.layers:
            block.attn.softcap = None
    else:
        model.cfg.final_softcap = None
    idx = tokens(2, SEQ)
    with torch.no_grad():
        logits, _ = model(idx)
    assert (logits - reference_logits(ref, idx)).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------
# Rotary embeddings
# ----------------------------------------------------------------------------------------------

ROPES = {  # name: (hidden size, heads, rope parameters) of real models
    "default": (2048, 32, dict(rope_type="default")),
    "linear": (2048, 32, dict(rope_type="linear", factor=4.0)),
    "llama3-factor8": (4096, 32, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,   # Llama 3.1
                                      high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama3-factor32": (2048, 32, dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,  # Llama 3.2
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


@pytest.mark.parametrize("name", ROPES)
def test_rope_matches_transformers(name):
    """Inverse frequencies and cos/sin tables, read from a config.json as transformers writes it."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    dim, heads, params = ROPES[name]
    hf = LlamaConfig(hidden_size=dim, num_attention_heads=heads, max_position_embeddings=131072,
                     rope_parameters=dict(params, rope_theta=500000.0))
    kind = params["rope_type"]
    # transformers 5 keeps the plain rope in the model class, the scaled ones in ROPE_INIT_FUNCTIONS
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    expected, _ = init(hf, device="cpu")

    cfg = config_from_hf(hf.to_dict())
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert_close(inv_freq, expected, rtol=1e-6, atol=0)

    pos = torch.tensor([[0, 1, 7, 100, 4095, 8191, 8192, 65536, 131071]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = rope_cos_sin(inv_freq, pos, torch.float32)
    assert_close(cos, hf_cos, rtol=0, atol=1e-6)
    assert_close(sin, hf_sin, rtol=0, atol=1e-6)


def test_gemma3_rope_matches_transformers():
    """Gemma 3 (4B and up): global layers base 1e6 with linear scaling, sliding layers base 1e4 unscaled."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    hf = Gemma3TextConfig(rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                                           "sliding_attention": dict(rope_type="default", rope_theta=1e4)})
    reference = Gemma3RotaryEmbedding(hf)
    with torch.device("meta"):                             # no weights needed, only the config
        model = Model(config_from_hf(hf.to_dict()))
    assert_close(model.inv_freq(False, "cpu"), reference.full_attention_inv_freq, rtol=1e-6, atol=0)
    assert_close(model.inv_freq(True, "cpu"), reference.sliding_attention_inv_freq, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_recompute(model, prompt, steps):
    """Greedy decoding that reruns the whole sequence for every new token."""
    idx = prompt
    for _ in range(steps):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@torch.no_grad()
def greedy_cached(model, prompt, steps):
    """Greedy decoding with a KV cache: the prompt once, then one token at a time.

    Returns the tokens (B, T + steps) and the logits that chose each new token (B, steps, V).
    """
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    idx, step_input, chosen_by = prompt, prompt, []
    for _ in range(steps):
        logits, _ = model(step_input, cache=cache, last_only=True)       # (B, 1, V)
        chosen_by.append(logits[:, -1])
        step_input = logits[:, -1].argmax(-1, keepdim=True)           # (B, 1)
        idx = torch.cat([idx, step_input], dim=1)
    return idx, torch.stack(chosen_by, dim=1)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_greedy_decoding_matches_recomputation(tiny_hf, model_type, batch):
    # An untied head: a tied random Gemma just repeats its input token, which tests little.
    _, folder = tiny_hf(model_type, **{**FAMILIES[model_type], "tie_word_embeddings": False})
    model = load_model(folder)
    prompt = tokens(batch, 5)
    steps = 3 * WINDOW - 5                       # the decoded tail outgrows the sliding window
    expected = greedy_recompute(model, prompt, steps)
    assert len(set(expected[0, 5:].tolist())) > 3, "degenerate test: greedy repeats itself"
    cached, cached_logits = greedy_cached(model, prompt, steps)
    assert torch.equal(cached, expected)
    with torch.no_grad():
        full_logits, _ = model(expected[:, :-1])
    assert_close(cached_logits, full_logits[:, 4:], **TOL)

"""Shared fixtures for the test suite.

`tiny_hf` builds a tiny random Hugging Face model with transformers (the reference
implementation), saves it as a model folder the way the Hub ships one, and returns both:
the tests then load that folder with our loader and compare against the reference.
"""
import pytest
import torch

import load_weights

# Tiny tensors gain nothing from threads, and on a shared machine a busy core stalls every
# multi-threaded op (a (2, 64) matmul went from 0.1 ms to 20 ms): one thread, always.
torch.set_num_threads(1)

# The unit tests' tiny model, in ModelConfig fields (LLaMA-style; a test adds the fields of
# the family it needs): two layers, grouped K/V heads, a head_dim unlike width / heads.
TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=64)

# The same for transformers' configs. Two layers, width 64: small enough to run in well under a second, big enough that
# grouped heads, a head_dim unlike width/heads, and a second layer all exist.
TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               initializer_range=0.3)  # large weights: a wrong formula moves the logits visibly


def build_hf_model(model_type: str, seed: int = 0, **config):
    """A random float32 transformers model of model_type; TINY_HF overridden by config."""
    import transformers
    hf_config = transformers.CONFIG_MAPPING[model_type](**{**TINY_HF, **config})
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    ref = ref.float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                # Norm weights and biases start at exactly 0 or 1, which would hide a wrong
                # norm formula (w vs 1 + w) or a dropped bias: shake them.
                p.add_(0.3 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Factory: tiny_hf(model_type, **config) -> (reference model, folder it is saved in).

    Built once per distinct config and session (transformers is slow to build models);
    callers must not modify the reference model or the folder.
    """
    built = {}

    def make(model_type: str, seed: int = 0, **config):
        key = (model_type, seed, repr(sorted(config.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(model_type)
            ref = build_hf_model(model_type, seed, **config)
            ref.save_pretrained(folder)
            built[key] = ref, folder
        return built[key]

    return make


# A word-level tokenizer over a 64-token vocabulary: the tiny models' own.
SPECIALS = ["<unk>", "<bos>", "<eos>"]                     # ids 0, 1, 2
WORDS = "the a cat dog sat ran on under mat log and then it was big small red blue".split()
WORDS += [f"w{i}" for i in range(64 - len(SPECIALS) - len(WORDS))]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
TOKENIZER_HF = dict(vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=0)


def write_tokenizer(path, adds_bos: bool):
    """tokenizer.json: without a post-processor (like SmolLM2's) or one prepending <bos> (like Gemma's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(path))


def tiny_model_folder(tiny_hf, tmp_path_factory, model_type: str, adds_bos=None, **config):
    """A complete tiny model folder (weights, config.json, tokenizer.json) of model_type."""
    import shutil
    _, hf_folder = tiny_hf(model_type, **{**TOKENIZER_HF, **config})
    folder = tmp_path_factory.mktemp(f"{model_type}_model")
    shutil.copytree(hf_folder, folder, dirs_exist_ok=True)
    write_tokenizer(folder / "tokenizer.json", model_type.startswith("gemma") if adds_bos is None else adds_bos)
    return folder


def word_text_file(tmp_path_factory, name: str, n_words: int, seed: int):
    """A text file of n_words random words the tiny tokenizer knows (a held-out text)."""
    import random
    rng = random.Random(seed)
    path = tmp_path_factory.mktemp(name) / f"{name}.txt"
    path.write_text(" ".join(rng.choice(WORDS[:18]) for _ in range(n_words)))
    return path


def real_checkpoint(preset: str):
    """The folder of a preset's real weights, found by name as load_weights finds it:
    $NANOSKIP_CHECKPOINTS/<name>, checkpoints/<name>, the Hugging Face cache, or the Hub. The
    real-weight tests (-m real) fail with the way to make it when it cannot be had."""
    try:
        return load_weights.resolve(preset)
    except load_weights.LoadError as e:
        pytest.fail(f"{e}\nOffline, make the real checkpoints with `python3 tools/make_checkpoints.py checkpoints`")

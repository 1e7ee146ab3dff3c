"""model.py — one decoder for the Gemma and LLaMA families, with routable sublayers.

A block is two sublayers, each "norm -> f -> residual add":

    h = h + g_attn * post_norm(attention(attn_norm(h)))
    h = h + g_mlp  * post_norm(mlp(mlp_norm(h)))

For a dense model the gates g are 1 and the post-norms exist only in Gemma 2/3.
Every family difference (Gemma's (1 + w) norms, embedding scale, GeGLU vs SwiGLU,
sandwich norms, q/k norms, soft-capping, sliding windows, two rope bases, llama3
rope scaling, qkv bias, tied head) is a field of `ModelConfig`; there is one block.

Two forward paths give the same answer for the same gates (DESIGN.md):
- masked (training): every sublayer runs on every token and is multiplied by the
  straight-through gate, so routers get a gradient;
- compacted (inference): each sublayer runs on the kept tokens only (router.py
  gathers them and scatters the result back), with an optional KV cache.

Shapes: B batch, T tokens in this call, S cached tokens, d model width,
H query heads, Hkv key/value heads, D head dim, V vocabulary.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import router as rt


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int                          # hidden size d
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    norm_offset: bool = False         # Gemma: norm weight stored as offset, multiply by (1 + w) in float32
    act: str = "silu"                 # "silu" (SwiGLU, LLaMA) or "gelu_tanh" (GeGLU, Gemma)
    embed_scale: bool = False         # Gemma: embeddings times sqrt(d), in the activation dtype
    sandwich_norm: bool = False       # Gemma 2/3: a second norm after each sublayer
    qk_norm: bool = False             # Gemma 3: RMSNorm on q and k, per head
    qkv_bias: bool = False            # Qwen2: biases on the q, k, v projections
    query_scale: Optional[float] = None   # scores scaled by query_scale**-0.5 (Gemma 2/3); None = head_dim
    attn_softcap: Optional[float] = None  # Gemma 2: cap * tanh(scores / cap)
    final_softcap: Optional[float] = None # Gemma 2: cap * tanh(logits / cap)
    sliding_window: Optional[int] = None  # tokens a "sliding" layer sees, itself included
    layer_types: Optional[tuple] = None   # per layer "full" or "sliding"; None = all full
    rope_theta: float = 10000.0           # rotary base of full-attention layers
    rope_local_theta: Optional[float] = None  # rotary base of sliding layers (Gemma 3); None = rope_theta
    rope_scaling: Optional[dict] = None   # {"type": "llama3"|"linear", "factor": ..., ...} for full layers
    tie_embeddings: bool = True
    bos_id: Optional[int] = None
    eos_ids: tuple = ()
    hf_repo: str = ""                 # where the official weights live on the Hugging Face Hub
    # Routing (the sparse model); set by router.add_routers
    route: str = "none"               # "none" (dense), "sublayer", "attn", "mlp" or "block"
    kv: str = "all"                   # "all": skipped tokens still write K/V; "kept": they are absent

    def __post_init__(self):
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        self.eos_ids = tuple(self.eos_ids)

    def layer_type(self, i: int) -> str:
        return "full" if self.layer_types is None else self.layer_types[i]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4 or 5 format)."""
        return _from_hf_config(cls, hf)


def _gemma3_layer_types(n_layers, pattern):
    # every `pattern`-th layer is global, the rest slide (HF: (i + 1) % pattern != 0 -> sliding)
    return ["sliding" if (i + 1) % pattern else "full" for i in range(n_layers)]


_GEMMA = dict(norm_eps=1e-6, norm_offset=True, act="gelu_tanh", embed_scale=True, tie_embeddings=True,
              bos_id=2, eos_ids=(1,))
_GEMMA2 = dict(_GEMMA, sandwich_norm=True, query_scale=256.0, attn_softcap=50.0, final_softcap=30.0,
               sliding_window=4096, rope_theta=10000.0)
_GEMMA3 = dict(_GEMMA, sandwich_norm=True, qk_norm=True, query_scale=256.0, sliding_window=512,
               rope_theta=1e6, rope_local_theta=1e4, vocab_size=262144, max_seq_len=32768, eos_ids=(1, 106))
_LLAMA3_SCALING = dict(type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_SMOL = dict(vocab_size=49152, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
             bos_id=0, eos_ids=(0,))

PRESETS = {
    "gemma-2b": dict(_GEMMA, hf_repo="google/gemma-2b", vocab_size=256000, dim=2048, n_layers=18, n_heads=8,
                     n_kv_heads=1, head_dim=256, ffn_dim=16384, max_seq_len=8192),
    "gemma-7b": dict(_GEMMA, hf_repo="google/gemma-7b", vocab_size=256000, dim=3072, n_layers=28, n_heads=16,
                     n_kv_heads=16, head_dim=256, ffn_dim=24576, max_seq_len=8192),
    "gemma-2-2b": dict(_GEMMA2, hf_repo="google/gemma-2-2b", vocab_size=256000, dim=2304, n_layers=26,
                       n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=9216, max_seq_len=8192,
                       layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(26))),
    "gemma-2-9b": dict(_GEMMA2, hf_repo="google/gemma-2-9b", vocab_size=256000, dim=3584, n_layers=42,
                       n_heads=16, n_kv_heads=8, head_dim=256, ffn_dim=14336, max_seq_len=8192,
                       layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(42))),
    "gemma-3-270m": dict(_GEMMA3, hf_repo="google/gemma-3-270m", dim=640, n_layers=18, n_heads=4,
                         n_kv_heads=1, head_dim=256, ffn_dim=2048, layer_types=tuple(_gemma3_layer_types(18, 6))),
    "gemma-3-1b": dict(_GEMMA3, hf_repo="google/gemma-3-1b-pt", dim=1152, n_layers=26, n_heads=4,
                       n_kv_heads=1, head_dim=256, ffn_dim=6912, layer_types=tuple(_gemma3_layer_types(26, 6))),
    "llama-2-7b": dict(hf_repo="meta-llama/Llama-2-7b-hf", vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                       n_kv_heads=32, head_dim=128, ffn_dim=11008, max_seq_len=4096, tie_embeddings=False,
                       bos_id=1, eos_ids=(2,)),
    "llama-3.1-8b": dict(hf_repo="meta-llama/Llama-3.1-8B", vocab_size=128256, dim=4096, n_layers=32,
                         n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336, max_seq_len=131072,
                         rope_theta=500000.0, rope_scaling=dict(_LLAMA3_SCALING, factor=8.0),
                         tie_embeddings=False, bos_id=128000, eos_ids=(128001,)),
    "llama-3.2-1b": dict(hf_repo="meta-llama/Llama-3.2-1B", vocab_size=128256, dim=2048, n_layers=16,
                         n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192, max_seq_len=131072,
                         rope_theta=500000.0, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0),
                         tie_embeddings=True, bos_id=128000, eos_ids=(128001,)),
    "llama-3.2-3b": dict(hf_repo="meta-llama/Llama-3.2-3B", vocab_size=128256, dim=3072, n_layers=28,
                         n_heads=24, n_kv_heads=8, head_dim=128, ffn_dim=8192, max_seq_len=131072,
                         rope_theta=500000.0, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0),
                         tie_embeddings=True, bos_id=128000, eos_ids=(128001,)),
    "smollm2-135m": dict(_SMOL, hf_repo="HuggingFaceTB/SmolLM2-135M", dim=576, n_layers=30, n_heads=9,
                         n_kv_heads=3, head_dim=64, ffn_dim=1536),
    "smollm2-135m-instruct": dict(_SMOL, hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct", dim=576, n_layers=30,
                                  n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536, bos_id=1, eos_ids=(2,)),
    "smollm2-360m": dict(_SMOL, hf_repo="HuggingFaceTB/SmolLM2-360M", dim=960, n_layers=32, n_heads=15,
                         n_kv_heads=5, head_dim=64, ffn_dim=2560),
    "smollm2-1.7b": dict(_SMOL, hf_repo="HuggingFaceTB/SmolLM2-1.7B", dim=2048, n_layers=24, n_heads=32,
                         n_kv_heads=32, head_dim=64, ffn_dim=8192, rope_theta=130000.0),
    "tinyllama-1.1b": dict(hf_repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", vocab_size=32000,
                           dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64, ffn_dim=5632,
                           max_seq_len=2048, tie_embeddings=False, bos_id=1, eos_ids=(2,)),
}


# ----------------------------------------------------------------------------------------------
# Reading a Hugging Face config.json
# ----------------------------------------------------------------------------------------------

HF_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2")


def _need(hf, key):
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}, which a {hf.get('model_type')} model needs")
    return hf[key]


def _rope_params(hf: dict):
    """(theta, scaling) of full-attention layers and theta of sliding layers, from either format.

    transformers 4 writes top-level rope_theta / rope_scaling (and Gemma 3 rope_local_base_freq);
    transformers 5 writes rope_parameters, per layer type for Gemma 3. A missing base is an error:
    a silent default would give wrong positions and plausible-looking text.
    """
    rp = hf.get("rope_parameters")
    if rp is not None:
        if "full_attention" in rp:   # one entry per layer type
            if hf.get("model_type") == "gemma3_text" and "sliding_attention" not in rp:
                raise ValueError("config.json rope_parameters has no 'sliding_attention' entry, "
                                 "which gives Gemma 3's sliding layers their rotary base")
            full, local = rp["full_attention"], rp.get("sliding_attention", rp["full_attention"])
        else:
            full = local = rp
        if "rope_theta" not in full:
            raise ValueError("config.json rope_parameters has no 'rope_theta'")
        return float(full["rope_theta"]), _scaling(full), float(local.get("rope_theta", full["rope_theta"]))
    theta = float(_need(hf, "rope_theta"))
    if hf.get("model_type") == "gemma3_text":   # sliding layers have their own base (10k vs 1M)
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


def _layer_types(hf: dict, n_layers: int):
    if hf.get("layer_types") is not None:
        names = {"sliding_attention": "sliding", "full_attention": "full"}
        return tuple(names[t] for t in hf["layer_types"])
    mt = hf["model_type"]
    if mt == "gemma2":
        return tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))
    if mt == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return tuple(_gemma3_layer_types(n_layers, pattern))
    return None


def _from_hf_config(cls, hf: dict) -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise ValueError(f"model_type {mt!r} is not supported; supported: {', '.join(HF_MODEL_TYPES)}")
    gemma = mt.startswith("gemma")
    n_heads = _need(hf, "num_attention_heads")
    dim = _need(hf, "hidden_size")
    n_layers = _need(hf, "num_hidden_layers")
    theta, scaling, local_theta = _rope_params(hf)
    eos = hf.get("eos_token_id")
    window = hf.get("sliding_window")
    if mt == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    layer_types = _layer_types(hf, n_layers)
    if window is None and layer_types is not None:
        layer_types = None if all(t == "full" for t in layer_types) else layer_types
    if window is not None and layer_types is None and mt in ("mistral", "qwen2"):
        layer_types = ("sliding",) * n_layers
    if window is not None and layer_types is None:
        window = None
    if layer_types is not None and "sliding" in layer_types and window is None:
        raise ValueError("config.json has sliding layers but no 'sliding_window'")
    return cls(
        vocab_size=_need(hf, "vocab_size"), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or dim // n_heads,
        ffn_dim=_need(hf, "intermediate_size"),
        max_seq_len=_need(hf, "max_position_embeddings"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
        norm_offset=gemma, act="gelu_tanh" if gemma else "silu", embed_scale=gemma,
        sandwich_norm=mt in ("gemma2", "gemma3_text"), qk_norm=mt == "gemma3_text",
        qkv_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)),
        query_scale=float(hf["query_pre_attn_scalar"]) if mt in ("gemma2", "gemma3_text") else None,
        attn_softcap=hf.get("attn_logit_softcapping") if mt == "gemma2" else None,
        final_softcap=hf.get("final_logit_softcapping") if mt in ("gemma2", "gemma3_text") else None,
        sliding_window=window, layer_types=layer_types,
        rope_theta=theta, rope_local_theta=local_theta if local_theta != theta else None, rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        bos_id=hf.get("bos_token_id"),
        eos_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    )


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * w, normalized in float32.

    LLaMA casts back to the activation dtype, then multiplies by w. Gemma stores w as an
    offset (initialized at 0) and multiplies by (1 + w) in float32 before casting back.
    """

    def __init__(self, dim: int, eps: float, offset: bool):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, with llama3 or linear scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_seq_len"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    blend = (old_ctx / wavelen - lo) / (hi - lo)          # 0 at the long end, 1 at the short end
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype):
    """cos, sin of shape (*pos.shape, D) for integer positions, computed in float32."""
    freqs = pos.float()[..., None] * inv_freq                # (..., D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                  # (..., D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, D) by position, in the "rotate half" layout of Hugging Face.

    Official HF checkpoints store q/k weights permuted for this layout (the first half of
    each head pairs with the second half), so they load with no un-permuting.
    cos, sin: (B, T, D).
    """
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU for LLaMA, tanh-GELU for Gemma."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.act = cfg.act

    def forward(self, x):
        g = self.gate(x)
        # Gemma uses tanh-GELU whatever an old config.json says in hidden_act.
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down(g * self.up(x))


class LayerCache:
    """K/V cache of one layer, written by position like gpt-fast's static cache.

    Every sequence has its own fill level, so a kv="kept" layer stores only the tokens
    that layer kept: k, v (B, Hkv, S, D); pos (B, S) original positions; lengths, the
    filled slots per sequence, as Python ints (reading them costs no device sync).
    """

    def __init__(self, B, Hkv, S, D, dtype, device):
        self.k = torch.zeros(B, Hkv, S, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(B, S, dtype=torch.long, device=device)
        self.lengths = [0] * B

    def append(self, k, v, pos, p: Optional[rt.Packing] = None):
        """Write new k, v (B, Hkv, T, D) at positions pos (B, T); with p, only its valid slots."""
        B, _, T, _ = k.shape
        even = min(self.lengths) == max(self.lengths)
        if p is None and not even:
            # kv="kept" layers fill unevenly: write each sequence at its own level
            p = rt.pack(torch.ones(B, T, dtype=torch.bool, device=k.device))
        if p is None:  # every sequence writes all T tokens at the same level
            start = self.lengths[0]
            if start + T > self.k.shape[2]:
                raise ValueError(f"KV cache full: {start} + {T} tokens > its {self.k.shape[2]} slots")
            self.k[:, :, start:start + T] = k
            self.v[:, :, start:start + T] = v
            self.pos[:, start:start + T] = pos
            self.lengths = [n + T for n in self.lengths]
            return
        lengths = [n + c for n, c in zip(self.lengths, p.sizes)]
        if max(lengths) > self.k.shape[2]:
            raise ValueError(f"KV cache full: it has {self.k.shape[2]} slots")
        dst = torch.tensor(self.lengths, device=k.device)[p.b_idx] + p.slot    # (N,) where each token goes
        self.k[p.b_idx, :, dst] = k[p.b_idx, :, p.slot]
        self.v[p.b_idx, :, dst] = v[p.b_idx, :, p.slot]
        self.pos[p.b_idx, dst] = pos[p.b_idx, p.slot]
        self.lengths = lengths

    def view(self):
        """Filled part: k, v (B, Hkv, S', D), pos (B, S') with S' the longest fill, and
        valid (B, S') bool, or None when every sequence fills all S' slots."""
        n = max(self.lengths)
        valid = None
        if min(self.lengths) < n:
            valid = torch.arange(n, device=self.pos.device) < torch.tensor(self.lengths, device=self.pos.device)[:, None]
        return self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n], valid


class KVCache:
    """One LayerCache per layer, plus how many positions every sequence has seen."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype, device):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"{max_len} tokens exceed the model's context of {cfg.max_seq_len}: "
                             "use a shorter prompt or fewer new tokens")
        self.layers = [LayerCache(batch_size, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device)
                       for _ in range(cfg.n_layers)]
        self.seen = 0
        self.max_len = max_len


def attention_mask(q_pos, k_pos, window: Optional[int], k_valid=None):
    """(B, 1, Tq, Tk) bool: key visible to query iff causal, inside the window, and valid.

    Positions are the tokens' original positions, so a window is measured in real tokens
    even when skipped tokens are missing from the keys.
    q_pos (B, Tq), k_pos (B, Tk), k_valid (B, Tk) or None.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]             # (B, Tq, 1), (B, 1, Tk)
    mask = k <= q                                            # (B, Tq, Tk) causal
    if window is not None:
        mask &= k > q - window
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask[:, None]


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads (MHA, GQA, MQA)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * D, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, Hkv * D, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, Hkv * D, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * D, cfg.dim, bias=False)
        self.q_norm = RMSNorm(D, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.H, self.Hkv, self.D = H, Hkv, D
        self.scale = (cfg.query_scale if cfg.query_scale is not None else D) ** -0.5
        self.softcap = cfg.attn_softcap
        self.window = cfg.sliding_window if cfg.layer_type(layer) == "sliding" else None

    def project_q(self, x, cos, sin):
        """x (B, T, d) -> q (B, H, T, D), normed and rotated."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.H, self.D).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q, cos, sin)

    def project_kv(self, x, cos, sin):
        """x (B, T, d) -> k, v (B, Hkv, T, D); k normed and rotated."""
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        v = self.wv(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask, causal=False):
        """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), mask (B, 1, Tq, Tk) bool -> (B, Tq, H*D).

        mask None: every key is visible to every query (causal=True: the causal triangle).
        """
        B, _, Tq, _ = q.shape
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                               scale=self.scale, enable_gqa=self.H != self.Hkv)
        else:  # soft-capping needs the scores themselves: the explicit path
            rep = self.H // self.Hkv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q @ k.transpose(-2, -1)) * self.scale                   # (B, H, Tq, Tk)
            scores = self.softcap * torch.tanh(scores / self.softcap)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return y.transpose(1, 2).reshape(B, Tq, self.H * self.D)

    def attend_self(self, q, k, v, pos, key_ok=None):
        """Tokens attend to the keys of this same call (no cache): causal, windowed, and where
        key_ok (B, T, T) allows. Only causality left: the fused causal kernel, no mask built."""
        if key_ok is None and self.window is None and self.softcap is None:
            return self.attend(q, k, v, None, causal=True)
        mask = attention_mask(pos, pos, self.window)                      # (B, 1, T, T)
        return self.attend(q, k, v, mask if key_ok is None else mask & key_ok[:, None])


ZERO = torch.zeros(())   # gates compare with a tensor: a Python 0 would be wrapped in one per call


class Block(nn.Module):
    """Two routed sublayers: attention, then the MLP. Routers are attached by router.add_routers."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.attn = Attention(cfg, layer)
        self.attn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset) if cfg.sandwich_norm else None
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.mlp = MLP(cfg)
        self.mlp_post_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset) if cfg.sandwich_norm else None
        self.attn_router: Optional[rt.Router] = None
        self.mlp_router: Optional[rt.Router] = None
        self.cfg = cfg

    @staticmethod
    def _post(norm, y):
        return y if norm is None else norm(y)

    def forward(self, h, ctx: "Context"):
        x = self.attn_norm(h)                                             # (B, T, d)
        z_attn = self.attn_router(x) if self.attn_router is not None and not ctx.dense else None
        h = (self._attn_masked if ctx.masked else self._attn_compact)(h, x, z_attn, ctx)
        x = self.mlp_norm(h)
        if self.cfg.route == "block":
            z_mlp = z_attn                                                # one gate for the whole block
        else:
            z_mlp = self.mlp_router(x) if self.mlp_router is not None and not ctx.dense else None
        h = (self._mlp_masked if ctx.masked else self._mlp_compact)(h, x, z_mlp, ctx)
        return h

    def _record(self, ctx, kind, z):
        """Note the gates of this sublayer; returns keep (B, T) bool."""
        keep = z > ZERO
        ctx.records.append(rt.GateRecord(self.layer, kind, z, keep))
        return keep

    @staticmethod
    def _count(keep) -> int:
        """How many tokens compute (one device sync; a single decoded token needs no sum)."""
        return int(keep.item()) if keep.numel() == 1 else int(keep.sum())

    # --- masked path: every token computes, the gate multiplies (training) ---------------------

    def _attn_masked(self, h, x, z, ctx):
        a = self.attn
        B, T, _ = x.shape
        q = a.project_q(x, *ctx.rope[a.window is not None])
        k, v = a.project_kv(x, *ctx.rope[a.window is not None])
        key_ok = None
        if z is not None and self.cfg.kv == "kept":
            # A skipped token is no key for anyone; as a query it still sees itself, so that
            # sigmoid'(z) * f(x) — the router's gradient — is what keeping it would give.
            key_ok = (z > 0)[:, None, :] | torch.eye(T, dtype=torch.bool, device=x.device)
        y = self._post(self.attn_post_norm, a.wo(a.attend_self(q, k, v, ctx.pos.expand(B, T), key_ok)))
        if z is None:
            return h + y
        self._record(ctx, "attn", z)
        return h + rt.hard_gate(z).to(y.dtype)[..., None] * y

    def _mlp_masked(self, h, x, z, ctx):
        y = self._post(self.mlp_post_norm, self.mlp(x))
        if z is None:
            return h + y
        self._record(ctx, "mlp", z)
        return h + rt.hard_gate(z).to(y.dtype)[..., None] * y

    # --- compacted path: only kept tokens compute (inference) ----------------------------------

    def _mlp_compact(self, h, x, z, ctx):
        if z is None:
            return h + self._post(self.mlp_post_norm, self.mlp(x))
        keep = self._record(ctx, "mlp", z)
        n = self._count(keep)                                             # tokens that compute
        if n == keep.numel():                                             # all of them: no gather
            return h + self._post(self.mlp_post_norm, self.mlp(x))
        if n == 0:
            return h                                                      # weights not touched
        flat = keep.flatten().nonzero().squeeze(1)                        # (N,) rows of kept tokens
        y = self._post(self.mlp_post_norm, self.mlp(x.flatten(0, 1)[flat]))   # (N, d)
        return rt.scatter_add_rows(h, flat, y)

    def _attn_compact(self, h, x, z, ctx):
        a = self.attn
        layer_cache = ctx.cache.layers[self.layer] if ctx.cache is not None else None
        B, T, _ = x.shape
        cos, sin = ctx.rope[a.window is not None]                         # (1, T, D)
        keep = None if z is None else self._record(ctx, "attn", z)
        n = B * T if keep is None else self._count(keep)                  # tokens that ask

        if n == B * T:                                                    # everyone computes
            q = a.project_q(x, cos, sin)                                  # (B, H, T, D)
            k, v = a.project_kv(x, cos, sin)                              # (B, Hkv, T, D)
            if layer_cache is None:
                y = a.attend_self(q, k, v, ctx.pos.expand(B, T))
            else:
                y = self._attend_cache(q, k, v, ctx.pos.expand(B, T), layer_cache)
            return h + self._post(self.attn_post_norm, a.wo(y))

        if self.cfg.kv == "all":
            # Every token writes K/V; only kept tokens ask (query, scores, output projection).
            k, v = a.project_kv(x, cos, sin)                              # (B, Hkv, T, D)
            if layer_cache is not None:
                layer_cache.append(k, v, ctx.pos.expand(B, T))
        if n == 0:
            return h                                                      # nobody asks: no q, no wo
        # Kept tokens of each sequence packed side by side, padded to the longest count:
        # queries of different sequences never meet, so a (B, Tp) layout keeps the batched
        # kernels and wastes only the padding (Tp - count) per sequence.
        p = rt.pack(keep)
        xp = rt.to_packed(x.flatten(0, 1)[p.flat], p, B)                 # (B, Tp, d)
        q_pos = rt.to_packed(ctx.pos[0][p.t_idx], p, B)                  # (B, Tp) original positions
        cos_p, sin_p = rt.to_packed(cos[0][p.t_idx], p, B), rt.to_packed(sin[0][p.t_idx], p, B)
        q = a.project_q(xp, cos_p, sin_p)                                 # (B, H, Tp, D)
        if self.cfg.kv == "kept":
            # Skipped tokens are absent: K/V of kept tokens only, packed like the queries.
            k, v = a.project_kv(xp, cos_p, sin_p)                         # (B, Hkv, Tp, D)
            if layer_cache is not None:
                layer_cache.append(k, v, q_pos, p)
        if layer_cache is not None:
            k, v, k_pos, k_valid = layer_cache.view()                     # (B, Hkv, S, D) ...
        if self.cfg.kv == "all":
            y = self._attend_blocks(q, k, v, q_pos, p)                    # (B, Tp, H*D)
        elif layer_cache is None and a.window is None and a.softcap is None:
            # Keys are the queries, in order: the causal triangle over the kept tokens. A real
            # query never sees the padding, which comes after it.
            y = a.attend(q, k, v, None, causal=True)
        else:
            if layer_cache is None:
                k_pos, k_valid = q_pos, None if p.even else p.valid
            mask = attention_mask(q_pos, k_pos, a.window, k_valid)        # (B, 1, Tp, S)
            if not p.even:
                mask |= ~p.valid[:, None, :, None]                        # padded queries: no all-masked rows
            y = a.attend(q, k, v, mask)                                   # (B, Tp, H*D)
        y = self._post(self.attn_post_norm, a.wo(rt.from_packed(y, p)))  # (N, d)
        return rt.scatter_add_rows(h, p.flat, y)

    def _attend_blocks(self, q, k, v, q_pos, p: rt.Packing, block: int = 128):
        """kv="all": packed queries q (B, H, Tp, D) over keys k, v (B, Hkv, S, D) that sit at
        their positions (key s is the token at position s, cached or not).

        A block of queries needs only the keys from its earliest window start to its last
        position, so the work follows the visible pairs, not the whole (Tp x S) rectangle
        that one masked call would compute.
        """
        a, ys = self.attn, []
        for i in range(0, q.shape[2], block):
            qp = q_pos[:, i:i + block]                                    # (B, Tb) (padding: 0)
            hi = int(qp.max()) + 1
            lo = 0 if a.window is None else max(0, int(qp.min()) - a.window + 1)
            k_pos = torch.arange(lo, hi, device=q.device).expand(q.shape[0], -1)
            mask = attention_mask(qp, k_pos, a.window)                    # (B, 1, Tb, hi - lo)
            if not p.even:
                mask |= ~p.valid[:, None, i:i + block, None]              # padded queries: no all-masked rows
            ys.append(a.attend(q[:, :, i:i + block], k[:, :, lo:hi], v[:, :, lo:hi], mask))
        return torch.cat(ys, dim=1)

    def _attend_cache(self, q, k, v, pos, layer_cache):
        """Every token of this call asks: write its K/V to the cache, attend over the cache."""
        a = self.attn
        layer_cache.append(k, v, pos)
        k, v, k_pos, k_valid = layer_cache.view()                         # (B, Hkv, S, D) ...
        if q.shape[2] == 1 and a.window is None and k_valid is None:
            return a.attend(q, k, v, None)       # one new token and every cached key is visible
        return a.attend(q, k, v, attention_mask(pos, k_pos, a.window, k_valid))


@dataclass
class Context:
    """What every block of one forward call shares."""
    pos: torch.Tensor            # (1, T) original positions
    rope: dict                   # is_sliding -> (cos, sin), each (1, T, D)
    cache: Optional[KVCache]
    masked: bool
    dense: bool
    records: list


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._inv_freq = {}
        self.grad_checkpoint = False   # recompute each block in backward (train.py --grad_checkpoint)

    def head_weight(self):
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def inv_freq(self, sliding: bool, device):
        """Rotary inverse frequencies of full or sliding layers, made once per device."""
        key = (sliding, str(device))
        if key not in self._inv_freq:
            cfg = self.cfg
            if sliding and cfg.rope_local_theta is not None:
                # Gemma 3: sliding layers use their own base and no scaling
                inv = rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, None)
            else:
                inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            self._inv_freq[key] = inv.to(device)
        return self._inv_freq[key]

    def logits(self, hidden):
        """Final hidden (..., d) -> logits (..., V), soft-capped where the family does."""
        logits = F.linear(hidden, self.head_weight())
        if self.cfg.final_softcap is not None:
            cap = self.cfg.final_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx, cache: Optional[KVCache] = None, masked=False, dense=False,
                return_hidden=False, last_only=False):
        """idx (B, T) token ids -> (logits (B, T, V), gate records).

        masked:        training path (all tokens compute, gates multiply); no cache.
        dense:         ignore the routers (every gate open) — the teacher and the baseline.
        return_hidden: return the final normed hidden (B, T, d) instead of logits.
        last_only:     logits of the last position only (generation).
        """
        B, T = idx.shape
        start = cache.seen if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"{start + T} tokens exceed the model's context of {self.cfg.max_seq_len}")
        if masked and cache is not None:
            raise ValueError("the masked (training) path does not use a KV cache")
        pos = torch.arange(start, start + T, device=idx.device)[None]    # (1, T)
        h = self.tok_emb(idx)                                             # (B, T, d)
        if self.cfg.embed_scale:
            h = h * torch.tensor(self.cfg.dim ** 0.5, dtype=h.dtype)     # in the activation dtype
        rope = {s: rope_cos_sin(self.inv_freq(s, idx.device), pos, h.dtype) for s in (False, True)}
        ctx = Context(pos, rope, cache, masked, dense or self.cfg.route == "none", [])
        for block in self.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, ctx, use_reentrant=False)
            else:
                h = block(h, ctx)
        if cache is not None:
            cache.seen += T
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        return (h if return_hidden else self.logits(h)), ctx.records

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len, w.dtype, w.device)


# ----------------------------------------------------------------------------------------------
# The FLOP model: what a token costs, dense and sparse
# ----------------------------------------------------------------------------------------------

def sublayer_flops(cfg: ModelConfig, context: float) -> dict:
    """FLOPs per token (2 per multiply-add) of each part of one layer and of the LM head.

    context: average number of keys a query sees (e.g. (T + 1) / 2 in causal prefill of T).
    Returns {"q_o": .., "kv": .., "scores": .., "mlp": .., "head": .., "router": ..}; scores
    counts q·k and the weighted sum of v, over the visible keys.
    """
    d, H, Hkv, D, F_ = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    return dict(q_o=2 * 2 * d * H * D, kv=2 * 2 * d * Hkv * D, scores=2 * 2 * H * D * context,
                mlp=2 * 3 * d * F_, head=2 * d * cfg.vocab_size, router=2 * d)


def visible_keys(cfg: ModelConfig, layer: int, seq_len: int, queries: Optional[int] = None) -> float:
    """Average number of keys (itself included) a query sees in causal attention over seq_len
    tokens, when the queries are the last `queries` positions (None: all of them, a prefill;
    1: the next token of a decoding step)."""
    window = cfg.sliding_window if cfg.layer_type(layer) == "sliding" else None
    queries = seq_len if queries is None else queries
    t = torch.arange(seq_len - queries + 1, seq_len + 1, dtype=torch.float64)
    return float((t if window is None else t.clamp(max=window)).mean())


def compute_ratio(cfg: ModelConfig, seq_len: int, density=None, kv: Optional[str] = None,
                  queries: Optional[int] = None) -> float:
    """Executed FLOPs per token / dense FLOPs per token (DESIGN.md's honest number).

    density: {(layer, "attn"|"mlp"): fraction kept}; missing entries count as 1 (not routed).
    seq_len, queries: the context, as in visible_keys (decoding n tokens after a prompt of P:
    seq_len=P + n, queries=n).
    With kv="all" a skipped token still projects K and V, and a kept query sees every key.
    With kv="kept" a skipped token does neither, and a kept query sees itself plus, of its
    c - 1 other keys, the kept share of the other tokens: 1 + (c - 1) * (aT - 1) / (T - 1)
    keys instead of c (exact for a causal prefill of T tokens of which aT are kept).
    """
    kv = kv or cfg.kv
    density = density or {}
    dense = sparse = 0.0
    for layer in range(cfg.n_layers):
        c = visible_keys(cfg, layer, seq_len, queries)
        f = sublayer_flops(cfg, c)
        a, m = density.get((layer, "attn")), density.get((layer, "mlp"))
        dense += f["q_o"] + f["kv"] + f["scores"] + f["mlp"]
        a_ = 1.0 if a is None else a
        kv_cost = f["kv"] * (a_ if kv == "kept" else 1.0)
        others = max(a_ * seq_len - 1, 0) / (seq_len - 1) if seq_len > 1 else 0.0
        seen = (1 + others * (c - 1)) / c if kv == "kept" else 1.0     # share of the keys a kept query sees
        score_cost = f["scores"] * a_ * seen
        sparse += f["q_o"] * a_ + kv_cost + score_cost + f["mlp"] * (1.0 if m is None else m)
        n_routers = (a is not None) + (m is not None)
        sparse += f["router"] * (min(n_routers, 1) if cfg.route == "block" else n_routers)  # block: one router
    head = sublayer_flops(cfg, 1)["head"]
    return (sparse + head) / (dense + head)

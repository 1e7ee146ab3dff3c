"""model.py — one decoder for the Gemma and LLaMA families, with routable sublayers.

A block is two sublayers, each "norm -> gate -> f -> residual add":

    h = h + g_attn * post_norm(attention(attn_norm(h)))
    h = h + g_mlp  * post_norm(mlp(mlp_norm(h)))

For a dense model the gates g are 1 and the post-norms exist only in Gemma 2/3. Every family
difference (Gemma's (1 + w) norms, embedding scale, GeGLU vs SwiGLU, sandwich norms, q/k norms,
soft-capping, sliding windows, two rope bases, llama3 rope scaling, qkv bias, tied head) is a
field of `ModelConfig` (load_weights.py reads it from a config.json); there is one block.

The gates come from router.py. Two forward paths give the same answer for the same gates:
- masked (training): every sublayer runs on every token and is multiplied by the
  straight-through gate, so routers get a gradient;
- compacted (inference): each sublayer runs on the kept tokens only (compact.py), with an
  optional KV cache; one token of batch 1 is a plain branch per gate (compact.step).
Without routers (or with routers_off=True) both are the dense model.

Shapes: B batch, T tokens in this call, S cached tokens, d model width,
H query heads, Hkv key/value heads, D head dim, V vocabulary.
"""
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

import compact
import router


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
    sinks: bool = True                # position 0 and every BOS token always compute (router.sink_tokens)
    substitute: Optional[int] = None  # what a skip adds (router.Substitute): None = 0, 0 = a mean, r = rank r

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


def sliding_layer_types(n_layers, pattern):   # every pattern-th layer is global, the rest slide (Gemma 2: 2)
    return ["sliding" if (i + 1) % pattern else "full" for i in range(n_layers)]


_GEMMA = dict(norm_eps=1e-6, norm_offset=True, act="gelu_tanh", embed_scale=True, tie_embeddings=True,
              bos_id=2, eos_ids=(1,))
_GEMMA2 = dict(_GEMMA, sandwich_norm=True, query_scale=256.0, attn_softcap=50.0, final_softcap=30.0,
               sliding_window=4096, rope_theta=10000.0, vocab_size=256000, max_seq_len=8192)
_GEMMA3 = dict(_GEMMA, sandwich_norm=True, qk_norm=True, query_scale=256.0, sliding_window=512,
               rope_theta=1e6, rope_local_theta=1e4, vocab_size=262144, max_seq_len=32768, eos_ids=(1, 106))
_LLAMA3_SCALING = dict(type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
               bos_id=128000, eos_ids=(128001,))
_SMOL = dict(vocab_size=49152, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
             bos_id=0, eos_ids=(0,))

PRESETS = {
    "gemma-2b": dict(_GEMMA, hf_repo="google/gemma-2b", vocab_size=256000, dim=2048, n_layers=18, n_heads=8,
                     n_kv_heads=1, head_dim=256, ffn_dim=16384, max_seq_len=8192),
    "gemma-7b": dict(_GEMMA, hf_repo="google/gemma-7b", vocab_size=256000, dim=3072, n_layers=28, n_heads=16,
                     n_kv_heads=16, head_dim=256, ffn_dim=24576, max_seq_len=8192),
    "gemma-2-2b": dict(_GEMMA2, hf_repo="google/gemma-2-2b", dim=2304, n_layers=26, n_heads=8, n_kv_heads=4,
                       head_dim=256, ffn_dim=9216, layer_types=tuple(sliding_layer_types(26, 2))),
    "gemma-2-9b": dict(_GEMMA2, hf_repo="google/gemma-2-9b", dim=3584, n_layers=42, n_heads=16, n_kv_heads=8,
                       head_dim=256, ffn_dim=14336, layer_types=tuple(sliding_layer_types(42, 2))),
    "gemma-3-270m": dict(_GEMMA3, hf_repo="google/gemma-3-270m", dim=640, n_layers=18, n_heads=4,
                         n_kv_heads=1, head_dim=256, ffn_dim=2048, layer_types=tuple(sliding_layer_types(18, 6))),
    "gemma-3-1b": dict(_GEMMA3, hf_repo="google/gemma-3-1b-pt", dim=1152, n_layers=26, n_heads=4,
                       n_kv_heads=1, head_dim=256, ffn_dim=6912, layer_types=tuple(sliding_layer_types(26, 6))),
    "llama-2-7b": dict(hf_repo="meta-llama/Llama-2-7b-hf", vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                       n_kv_heads=32, head_dim=128, ffn_dim=11008, max_seq_len=4096, tie_embeddings=False,
                       bos_id=1, eos_ids=(2,)),
    "llama-3.1-8b": dict(_LLAMA3, hf_repo="meta-llama/Llama-3.1-8B", dim=4096, n_layers=32, n_heads=32,
                         head_dim=128, ffn_dim=14336, rope_scaling=dict(_LLAMA3_SCALING, factor=8.0),
                         tie_embeddings=False),
    "llama-3.2-1b": dict(_LLAMA3, hf_repo="meta-llama/Llama-3.2-1B", dim=2048, n_layers=16, n_heads=32,
                         head_dim=64, ffn_dim=8192, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0)),
    "llama-3.2-3b": dict(_LLAMA3, hf_repo="meta-llama/Llama-3.2-3B", dim=3072, n_layers=28, n_heads=24,
                         head_dim=128, ffn_dim=8192, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0)),
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


class RMSNorm(nn.Module):
    """x / rms(x) * w, normalized in float32. LLaMA casts back, then multiplies by w; Gemma stores w
    as an offset (initialized at 0) and multiplies by (1 + w) in float32 before casting back."""

    def __init__(self, dim: int, eps: float, offset: bool):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        # F.rms_norm without a weight: xf * rsqrt(mean(xf^2) + eps) in one call (one op's overhead)
        xf = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
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
    s = scaling
    factor, lo, hi, old_ctx = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_seq_len"]
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
    """Rotate x (B, heads, T, D) by position (cos, sin (B, T, D)), in Hugging Face's "rotate half"
    layout: official checkpoints store q/k permuted for it (the first half of each head pairs
    with the second half), so they load with no un-permuting."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


# SwiGLU (LLaMA) and GeGLU (Gemma: tanh-GELU, whatever an old config.json says in hidden_act)
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def softcap(x, cap: Optional[float]):
    """cap * tanh(x / cap) (Gemma 2's scores and logits), or x when cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU for LLaMA, tanh-GELU for Gemma."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {cfg.act!r}: choose one of {', '.join(ACTIVATIONS)}")
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


def attention_mask(q_pos, k_pos, window: Optional[int], k_valid=None):
    """(B, 1, Tq, Tk) bool: key visible to query iff causal, inside the window, and valid. q_pos
    (B, Tq), k_pos (B, Tk): original positions, so a window counts real tokens even when skipped
    tokens are missing from the keys; k_valid (B, Tk) or None."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]             # (B, Tq, 1), (B, 1, Tk)
    mask = k <= q                                            # (B, Tq, Tk) causal
    if window is not None:
        mask &= k > q - window
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask[:, None]


# Masked SDPA on a GPU: no cuDNN (a plan per new shape), K/V heads repeated (else only math takes a mask)
MASKED_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MASKED_REPEAT_KV = ("cuda",)   # the device types of that rule


class Attention(nn.Module):
    """Attention with grouped K/V heads (MHA, GQA, MQA): forward() is plain causal self-attention
    of every token; compact.py uses its pieces for the kept tokens only."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * D, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, Hkv * D, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, Hkv * D, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * D, cfg.dim, bias=False)
        qk_norm = lambda: RMSNorm(D, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None   # noqa: E731  Gemma 3
        self.q_norm, self.k_norm = qk_norm(), qk_norm()
        self.H, self.Hkv, self.D, self.softcap = H, Hkv, D, cfg.attn_softcap
        self.scale = (cfg.query_scale if cfg.query_scale is not None else D) ** -0.5
        self.window = cfg.sliding_window if cfg.layer_type(layer) == "sliding" else None

    def forward(self, x, cos, sin, pos, cache=None, key_ok=None):      # (B, T, d) -> (B, T, d)
        return self.wo(self.heads(x, cos, sin, pos, cache, key_ok))

    def heads(self, x, cos, sin, pos, cache=None, key_ok=None):
        """x (B, T, d) -> (B, T, H*D) before wo: each token attends to itself and the keys before it. cos, sin
        (1, T, D); pos (B, T); cache: the layer's LayerCache (new K/V join first); key_ok (B, T, T): visible keys."""
        q = self.project_q(x, cos, sin)                                   # (B, H, T, D)
        if cache is not None:
            compact.write_kv(self, cache, x, cos, sin, pos)
            return compact.attend_cache(self, q, pos, cache)
        k, v = self.project_kv(x, cos, sin)                               # (B, Hkv, T, D)
        if key_ok is None and self.window is None and self.softcap is None:
            return self.attend(q, k, v, None, causal=True)               # the fused causal kernel
        if key_ok is None and self.window is not None and x.shape[1] > self.window:
            return compact.attend_blocks(self, q, k, v, pos)             # a sliding layer: its band (CPU: in blocks)
        mask = self.mask(pos, pos)                                        # (B, 1, T, T)
        return self.attend(q, k, v, mask if key_ok is None else mask & key_ok[:, None])

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

    def mask(self, q_pos, k_pos, k_valid=None):
        """attention_mask with this layer's window: (B, 1, Tq, Tk) bool."""
        return attention_mask(q_pos, k_pos, self.window, k_valid)

    def attend(self, q, k, v, mask, causal=False):
        """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), mask (B, 1, Tq, Tk) bool -> (B, Tq, H*D). mask None:
        every key visible (causal=True: the fused causal kernel; soft-capping needs a mask)."""
        assert not (causal and (mask is not None or self.softcap is not None)), "causal=True: no mask, no soft-cap"
        rep, masked_gpu = self.H // self.Hkv, mask is not None and q.device.type in MASKED_REPEAT_KV
        if rep > 1 and (masked_gpu or self.softcap is not None):     # K/V heads repeated (see above)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.softcap is None:
            with sdpa_kernel(MASKED_CUDA_BACKENDS) if masked_gpu else nullcontext():
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                   scale=self.scale, enable_gqa=k.shape[1] != self.H)
        else:  # soft-capping needs the scores themselves: the explicit path
            scores = softcap((q @ k.transpose(-2, -1)) * self.scale, self.softcap)   # (B, H, Tq, Tk)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return y.transpose(1, 2).flatten(2)                               # (B, Tq, H*D)


class Block(nn.Module):
    """norm -> gate -> attention -> norm -> gate -> MLP."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        norm = lambda: RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)   # noqa: E731
        post_norm = norm if cfg.sandwich_norm else nn.Identity            # Gemma 2/3 only
        self.attn_norm, self.attn, self.attn_post_norm = norm(), Attention(cfg, layer), post_norm()
        self.mlp_norm, self.mlp, self.mlp_post_norm = norm(), MLP(cfg), post_norm()
        self.attn_router = self.mlp_router = None     # router.Router, set by router.add_routers (None: dense)
        self.attn_skip = self.mlp_skip = None         # router.Substitute: what a skip adds (None: 0)

    def forward(self, h, ctx: "Context"):
        if ctx.one_token:                       # a decoding step of batch 1: a plain branch per gate
            return compact.step(self, h, ctx)
        x = self.attn_norm(h)                                             # (B, T, d)
        g = self.gate("attn", x, ctx)                                     # None: every token computes
        h = self.attention(h, x, g, ctx)
        x = self.mlp_norm(h)
        g = self.gate("mlp", x, ctx, g)
        return self.feed_forward(h, x, g, ctx)

    def gate(self, kind, x, ctx, attn_gate=None) -> Optional[router.GateRecord]:
        """This sublayer's gates (noted in ctx.records), or None when every token computes."""
        if kind == "mlp" and self.cfg.route == "block":                  # one gate for the whole block
            g = None if attn_gate is None else router.GateRecord(self.layer, "mlp", attn_gate.z, attn_gate.keep)
        else:
            r = self.attn_router if kind == "attn" else self.mlp_router
            g = router.decide(r, x, self.layer, kind, ctx.routers_off, ctx.sink)
        if g is not None:
            ctx.records.append(g)
        return g

    def attention(self, h, x, g, ctx):
        a = self.attn
        cos, sin = ctx.rope[a.window is not None]                         # (1, T, D)
        pos = ctx.pos.expand(x.shape[0], -1)                              # (B, T)
        if ctx.masked:
            # kv="kept": a skipped token is no key for anyone; as a query it still sees itself,
            # so that sigmoid'(z) * f(x) — the router's gradient — is what keeping it would give.
            kept_keys = g is not None and self.cfg.kv == "kept"
            key_ok = g.keep[:, None, :] | torch.eye(x.shape[1], dtype=torch.bool, device=x.device) if kept_keys else None
            return gated(h, self.attn_post_norm(a(x, cos, sin, pos, key_ok=key_ok)), g, self.attn_skip, x)
        cache = ctx.cache.layers[self.layer] if ctx.cache is not None else None
        if g is None:
            return h + self.attn_post_norm(a(x, cos, sin, pos, cache))
        h = compact.attention(a, self.attn_post_norm, h, x, g.keep, cos, sin, pos, cache, self.cfg.kv)
        return compact.skipped_rows(self.attn_skip, h, x, g.keep)

    def feed_forward(self, h, x, g, ctx):
        f = lambda rows: self.mlp_post_norm(self.mlp(rows))              # noqa: E731  (..., d)
        if ctx.masked:
            return gated(h, f(x), g, self.mlp_skip, x)
        if g is None:
            return h + f(x)
        return compact.skipped_rows(self.mlp_skip, compact.kept_rows(f, h, x, g.keep), x, g.keep)


def gated(h, y, g: Optional[router.GateRecord], skip=None, x=None):
    """Masked path: h + g * y + (1 - g) * skip(x) (no skip: 0); g hard forward, straight-through backward."""
    if g is None:
        return h + y
    gate = router.hard_gate(g.z, g.keep).to(y.dtype)[..., None]
    return h + gate * y if skip is None else h + gate * y + (1 - gate) * skip(x)


class Context:
    """What every block of one forward call shares. (A plain class: FSDP rebuilds dataclass
    arguments holding tensors that need gradients, so blocks would append records to copies.)"""

    def __init__(self, pos, rope, cache, masked, routers_off, records, sink=None):
        self.one_token = cache is not None and pos.shape[1] == 1 and cache.batch_size == 1   # compact.step
        self.pos = pos                   # (1, T) original positions
        self.rope = rope                 # is_sliding -> (cos, sin), each (1, T, D)
        self.cache = cache               # compact.KVCache or None
        self.masked = masked             # the training path
        self.routers_off = routers_off   # every token computes every sublayer
        self.records = records           # router.GateRecord of every routed sublayer, in order
        self.sink = sink                 # (B, T) bool tokens that always compute, or None


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

    def head_weight(self):   # tied embeddings or a head of its own
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def inv_freq(self, sliding: bool, device):
        """Rotary inverse frequencies of full or sliding layers, made once per device."""
        key, cfg = (sliding, str(device)), self.cfg
        if key not in self._inv_freq:
            local = sliding and cfg.rope_local_theta is not None      # Gemma 3: their own base, no scaling
            theta, scaling = (cfg.rope_local_theta, None) if local else (cfg.rope_theta, cfg.rope_scaling)
            self._inv_freq[key] = rope_inv_freq(cfg.head_dim, theta, scaling).to(device)
        return self._inv_freq[key]

    def logits(self, hidden):   # final hidden (..., d) -> logits (..., V), soft-capped where the family does
        return softcap(F.linear(hidden, self.head_weight()), self.cfg.final_softcap)

    def forward(self, idx, cache: Optional[compact.KVCache] = None, masked=False, routers_off=False,
                return_hidden=False, last_only=False):
        """idx (B, T) token ids -> (logits (B, T, V), gate records).
        masked:        training path (all tokens compute, gates multiply); no cache.
        routers_off:   routers not run, every token computes every sublayer (LoRA stays as it
                       is): the dense model of these weights, for the teacher and the baselines.
        return_hidden: return the final normed hidden (B, T, d) instead of logits.
        last_only:     logits of the last position only (generation).
        """
        B, T = idx.shape
        start = cache.reserve(T) if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"{start + T} tokens exceed the model's context of {self.cfg.max_seq_len}")
        if masked and cache is not None:
            raise ValueError("the masked (training) path does not use a KV cache")
        pos = torch.arange(start, start + T, device=idx.device)[None]    # (1, T)
        h = self.tok_emb(idx)                                             # (B, T, d)
        if self.cfg.embed_scale:
            h = h * torch.tensor(self.cfg.dim ** 0.5, dtype=h.dtype)     # in the activation dtype
        rope = {s: rope_cos_sin(self.inv_freq(s, idx.device), pos, h.dtype) for s in (False, True)}
        ctx = Context(pos, rope, cache, masked, routers_off, [],
                      None if routers_off else router.sink_tokens(idx, start, self.cfg))
        for block in self.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, ctx, use_reentrant=False)
            else:
                h = block(h, ctx)
        if cache is not None:
            cache.seen += T
        h = self.norm(h[:, -1:] if last_only else h)                     # norm is per token
        # a copy: with grad_checkpoint, backward reruns every block and its gates append again
        return (h if return_hidden else self.logits(h)), list(ctx.records)

    def new_cache(self, batch_size: int, max_len: int) -> compact.KVCache:
        return compact.KVCache(self.cfg, batch_size, max_len, self.tok_emb.weight.dtype, self.tok_emb.weight.device)

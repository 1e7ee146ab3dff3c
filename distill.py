"""distill.py — the training loss: KL from the dense teacher to the sparse student, over the vocabulary in chunks.

    kl, ce, records = distill_losses(model, x, ce_weight)    # mean per token, and the gate records

The teacher is the same network with LoRA disabled and every gate open (no second copy of the
weights), run under no_grad; the student is LoRA on with hard per-token gates on the masked
path, so every router gets its straight-through gradient. On a 256k vocabulary a (tokens, V)
float32 tensor of logits would not fit: DistillLoss makes each chunk's logits, uses them and
drops them, and computes the gradient in the same pass (it is known in closed form).
"""
import torch

import lora
from model import softcap


def chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one (chunk, V) float32 tensor stays near 64 MB."""
    return max(16, (1 << 24) // vocab_size)


def capped_logits(h, weight, cap):
    """(c, d) hidden -> (c, V) float32 logits, soft-capped as the model does."""
    return softcap((h @ weight.t()).float(), cap)


class DistillLoss(torch.autograd.Function):
    """Sums of KL(teacher || student) and of the student's cross-entropy, over the vocabulary in chunks.

    A (tokens, V) tensor never exists: each chunk's logits are made, used, and dropped. The gradient
    with respect to the student's hidden state is known in closed form, dKL/ds = softmax(s) - p_t and
    dCE/ds = softmax(s) - onehot, so it is computed in the same pass and kept as (tokens, d) only;
    backward just scales it. The head weight is frozen (no gradient). (fctx is torch's autograd
    context, not model.py's Context.)
    """

    @staticmethod
    def forward(fctx, h_s, h_t, weight, targets, cap):
        # h_s, h_t: (N, d) student / teacher final hidden; weight: (V, d); targets: (N,) or None
        N = h_s.shape[0]
        grad_kl = torch.zeros(N, h_s.shape[1], dtype=torch.float32, device=h_s.device)
        grad_ce = torch.zeros_like(grad_kl) if targets is not None else None
        kl, ce = h_s.new_zeros((), dtype=torch.float32), h_s.new_zeros((), dtype=torch.float32)
        step = chunk_size(weight.shape[0])
        for i in range(0, N, step):
            s = capped_logits(h_s[i:i + step], weight, cap)                    # (c, V)
            logp_s = torch.log_softmax(s, dim=-1)
            logp_t = torch.log_softmax(capped_logits(h_t[i:i + step], weight, cap), dim=-1)
            p_t = logp_t.exp()
            kl += (p_t * (logp_t - logp_s)).sum()
            d_cap = None if cap is None else 1 - (s / cap) ** 2                 # d capped / d raw
            p_s = logp_s.exp()
            if targets is not None:
                rows = torch.arange(s.shape[0], device=s.device)
                tgt = targets[i:i + step]
                ce -= logp_s[rows, tgt].sum()
                g = p_s.clone()
                g[rows, tgt] -= 1
                grad_ce[i:i + step] = ((g if d_cap is None else g * d_cap).to(weight.dtype) @ weight).float()
            g = p_s - p_t
            grad_kl[i:i + step] = ((g if d_cap is None else g * d_cap).to(weight.dtype) @ weight).float()
        fctx.save_for_backward(grad_kl, grad_ce if grad_ce is not None else grad_kl)
        fctx.has_ce = targets is not None
        fctx.h_dtype = h_s.dtype
        return kl, ce

    @staticmethod
    def backward(fctx, g_kl, g_ce):
        grad_kl, grad_ce = fctx.saved_tensors
        grad = g_kl * grad_kl + (g_ce * grad_ce if fctx.has_ce else 0)
        return grad.to(fctx.h_dtype), None, None, None, None


def distill_losses(model, x, ce_weight: float, student=None):
    """Mean KL and CE per token, and the gate records for a (B, T) batch x.

    student: what runs the student pass, model itself or its DDP / FSDP wrapper (whose forward
    readies the gradient all-reduce of backward). The teacher pass has no backward: it runs on the bare
    model, around the wrapper.
    """
    with torch.no_grad(), lora.disabled(model):
        h_t, _ = model(x, routers_off=True, return_hidden=True)           # (B, T, d) teacher
    h_s, records = (student or model)(x, masked=True, return_hidden=True)  # (B, T, d) student
    B, T, d = h_s.shape
    targets = x[:, 1:].reshape(-1) if ce_weight > 0 else None
    # CE needs a next token: with ce > 0 both losses cover the positions that have one (all but
    # the last); with ce = 0 the KL covers every position
    h_s_used, h_t_used = (h_s[:, :-1], h_t[:, :-1]) if targets is not None else (h_s, h_t)
    kl, ce = DistillLoss.apply(h_s_used.reshape(-1, d), h_t_used.reshape(-1, d), model.head_weight(),
                               targets, model.cfg.final_softcap)
    n = h_s_used.shape[0] * h_s_used.shape[1]
    return kl / n, ce / n, records

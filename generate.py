"""generate.py — the generation loop: a KV cache, one token at a time, and a clock that counts a GPU's work.

    for next_ids, records in decode(model, idx, 40, temperature=0.8): ...   # step by step
    out = generate(model, idx, 40)                                          # (B, T + n) ids
    texts = pieces(tok, prompt_ids, new_ids)                                # what each token adds

Decoding prefills the prompt into a KV cache sized for the whole generation, then feeds one
token at a time and asks for the logits of the last position only. It stops after
max_new_tokens, or once every sequence has produced an end-of-sequence token. A model with
routers decodes through the compacted path (model.py), where a skipped sublayer is not run.
sample.py, timing.py and research/ share these.
"""
import time

import torch

import load_weights


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B, 1): argmax at temperature 0, else a draw."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]     # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)                   # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token once the more likely ones already hold top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.inference_mode()   # not just no_grad: no version counters or view tracking (~4 % of a step here)
def decode(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_ids=(),
           generator=None, routers_off=False):
    """Yield, step by step, (next ids (B, 1), gate records of the forward that predicted them).

    The first step prefills the whole prompt idx (B, T) (its records cover T positions), the
    others feed the previous token (records (B, 1)). A sequence that has ended keeps getting
    the smallest EOS id until all have ended.
    """
    B, T = idx.shape
    if T == 0:
        raise ValueError("the prompt is empty: pass --prompt=TEXT")
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"context of {model.cfg.max_seq_len} tokens: shorten the prompt or lower --max_new_tokens")
    cache = model.new_cache(B, T + max_new_tokens)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=idx.device)
    done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    x = idx
    for _ in range(max_new_tokens):
        logits, records = model(x, cache=cache, routers_off=routers_off, last_only=True)    # (B, 1, V)
        x = sample_next(load_weights.finite(logits[:, -1]), temperature, top_k, top_p, generator)   # (B, 1)
        if len(eos):
            x = torch.where(done, eos[0], x)
            done |= torch.isin(x, eos)
        yield x, records
        if len(eos) and bool(done.all()):
            return


def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_ids=(),
             generator=None, routers_off=False):
    """idx (B, T) prompt ids -> (B, T + n): the prompt and the n <= max_new_tokens new ids."""
    steps = decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_ids, generator, routers_off)
    return torch.cat([idx] + [x for x, _ in steps], dim=1)


def pieces(tok, prompt_ids, new_ids):
    """The text each new token adds, decoding the growing sequence (keeps spaces and multi-byte
    characters right where decoding tokens one by one would not); end-of-sequence tokens dropped."""
    out, ids = [], list(prompt_ids)
    before = tok.decode(ids)
    for t in new_ids:
        if t in tok.eos_ids:
            break
        ids.append(t)
        after = tok.decode(ids)
        out.append(after[len(before):])
        before = after
    return out


def now(device):
    """time.perf_counter, after waiting for the GPU's queued work (so that it is counted)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)   # count the GPU's work, not just its launch
    return time.perf_counter()

"""research/neuron_sparsity.py — a finer unit of skipping than a sublayer: each token computes
only its largest MLP neurons. Training-free.

An MLP computes h = act(gate(x)) * up(x), (F,) per token, then down(h). With --keep=q every token
keeps q·F of its F neurons and sets the others' h to 0, so the projections that read them skip
them. Two ways to choose (--select):

- "down": the neurons of largest |h|. Only the down projection (a third of the MLP's FLOPs) can
  skip, since h needs gate and up in full.
- "gate": the neurons of largest |act(gate(x))|, as CATS does. gate runs in full and decides; up
  and down (two thirds of the FLOPs) skip the rest.

The skip is per token and per neuron, decided from values the MLP computes anyway (no router).
For each q, this measures perplexity x dense on --text and the compute ratio (flops.compute_ratio,
with the skipping projections of each computed MLP token counted at q of their FLOPs). With
--ckpt it acts on top of a routed checkpoint's own skips (a skipped MLP stays skipped and adds
its substitute); --gates=random replaces its routers by coin flips at the densities its learned
gates show with the same thinning, and --gates=peek by the peek rule (gates.py) set to
--target_compute before the thinning (give the learned row's compute at keep 1). It then times
the down projections at batch 1 and at --seq_len rows, every layer's in turn (as a forward pass
runs them, so the weights come from memory, not cache): dense, against a top-k and torch's
embedding_bag (the gather-and-weighted-sum of the kept rows of the transposed weight), the median
of --repeat runs of each (a tenth of them at --seq_len rows).
On the dense model it also times whole decoding steps after --prompt_len random ids with every
down projection gathered, against the dense steps, in lockstep (timing.decode_runs).

    python -m research.neuron_sparsity --text=vim.txt --json
    python -m research.neuron_sparsity --text=vim.txt --select=gate --keeps=0.8,0.7,0.6 --repeat=0 --json
    python -m research.neuron_sparsity --ckpt=out/run --text=vim.txt --keeps=0.5 --json

Every option below is --key=value or --key value (python -m research.neuron_sparsity --help).
"""
import copy
import math
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from configurator import AT_LEAST_0, AT_LEAST_1, FRACTION, Range, check_ranges, run_main
from flops import compute_ratio, sublayer_flops, visible_keys
from gates import forced, gates_as
from generate import generate
from scoring import evaluate, read_text, research_main, windows
from timing import decode_runs

DEFAULTS = dict(
    init="checkpoints/smollm2-135m-instruct-f32",  # preset name or Hugging Face folder
    ckpt="",                       # a routed checkpoint to act on (its skips stay); "" : the dense model
    text="",                       # the text (required)
    seq_len=512,
    max_chunks=6,                  # windows of --text
    batch_size=4,
    keeps=(0.6, 0.5, 0.4, 0.3),    # the fractions of each token's MLP neurons kept
    select="down",                 # "down": by |h|, down alone; "gate": by |act(gate(x))|, up and down
    block=1,                       # neurons kept or skipped together, in blocks of this many (in order)
    repeat=50,                     # timed runs of the down projections (0: no timing), a tenth of
                                   # them for prefill rows and decoding
    prompt_len=256,                # decoding timed after a prompt of this many random ids
    new_tokens=32,                 # ... for this many tokens (0: not timed; only without --ckpt, by |h|)
    gates="learned",               # --ckpt: learned, random (coin flips at the learned densities) or peek
    seed=1337,                     # for --gates=random
    target_compute=0.9,            # for --gates=peek: its compute ratio before any thinning
    dtype="float32",
    device="cpu",
    json=False,                    # print the result as JSON on the last line
)
SELECTS = ("down", "gate")
RANGES = dict(block=AT_LEAST_1, seq_len=Range(2), max_chunks=AT_LEAST_1, batch_size=AT_LEAST_1, keeps=FRACTION,
              repeat=AT_LEAST_0, seed=AT_LEAST_0,
              prompt_len=AT_LEAST_1, new_tokens=AT_LEAST_0, target_compute=Range(0, 1, open_lo=True))


def kept(n: int, keep: float) -> int:
    """How many of n neurons (or blocks) a token keeps at keep: round(keep·n), at least 1."""
    return min(max(1, round(keep * n)), n)


def neuron_mask(a: torch.Tensor, keep: float, block: int = 1) -> torch.Tensor:
    """a (..., F) -> bool (..., F): each row's round(keep·F/block) blocks of `block` neurons (in their
    order) of largest sum of |a|; block 1: its neurons of largest |a|. At least one block."""
    scores = a.abs() if block == 1 else a.abs().unflatten(-1, (-1, block)).sum(-1)     # (..., F / block)
    k = kept(scores.shape[-1], keep)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(k, dim=-1).indices, True)
    return mask if block == 1 else mask.repeat_interleave(block, dim=-1)


def keep_largest(h: torch.Tensor, keep: float, block: int = 1) -> torch.Tensor:
    """h (..., F) with all but each row's neuron_mask(h, keep, block) set to 0."""
    return h * neuron_mask(h, keep, block)


def thinning_hooks(model, keep: float, select: str = "down", when=None, block: int = 1) -> list:
    """Every MLP computes, per token, only round(keep·F) of its F neurons' share of the projections
    that select names: "down", the down projection reads the largest |h|; "gate", the up and down
    projections read the neurons of largest |act(gate(x))| (gate runs in full, then decides).
    block > 1: whole blocks of that many neurons are kept or skipped (neuron_mask).
    when: None, always; else a callable, and a forward in which when() is False runs in full (in a
    training run, when=lambda: lora.adapters(model)[0].enabled thins the student, not the teacher).
    Returns the hooks that do it (hook.remove() undoes it)."""
    def on():
        return when is None or when()

    hooks = []
    for b in model.layers:
        mlp = b.mlp
        if select == "down":
            hooks.append(mlp.down.register_forward_pre_hook(
                lambda _, args: (keep_largest(args[0], keep, block),) if on() else None))
        else:
            chosen = {}

            def choose(_, __, out, mlp=mlp, chosen=chosen):
                if on():
                    chosen["mask"] = neuron_mask(mlp.act(out), keep, block)

            def apply(_, args, chosen=chosen):
                return (args[0] * chosen.pop("mask"),) if "mask" in chosen else None

            hooks += [mlp.gate.register_forward_hook(choose), mlp.down.register_forward_pre_hook(apply)]
    return hooks


@contextmanager
def sparse_mlp(model, keep: float, select: str = "down", when=None, block: int = 1):
    """thinning_hooks inside the block, removed after it (even on error)."""
    hooks = thinning_hooks(model, keep, select, when, block)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def thin_student(model, keep: float) -> list:
    """train.py --mlp_keep: for the whole run, every MLP of the student (LoRA on) computes each
    token's down projection from its round(keep·F) neurons of largest |h|, in every forward and
    backward pass, the fits before training and the periodic evaluation; the dense teacher (LoRA
    off) runs in full. The routers, substitutes and LoRA train with the thinning."""
    adapters = lora.adapters(model)
    if not adapters:
        raise ValueError("--mlp_keep < 1 thins the student, told from the teacher by its LoRA adapters: "
                         "give --lora_rank > 0")
    return thinning_hooks(model, keep, "down", when=lambda: adapters[0].enabled)


def neuron_compute(cfg, seq_len: int, density: dict, keep: float, select: str = "down") -> float:
    """flops.compute_ratio, with every computed MLP token's down projection (select "down"), or its
    up and down projections ("gate"), at keep of their FLOPs."""
    share = 1 / 3 if select == "down" else 2 / 3          # of an MLP's 6·d·F FLOPs, 2·d·F each
    dense = sublayer_flops(cfg, 1)["head"]
    saved = 0.0
    for layer in range(cfg.n_layers):
        f = sublayer_flops(cfg, visible_keys(cfg, layer, seq_len))
        dense += f["q_o"] + f["kv"] + f["scores"] + f["mlp"]
        saved += (1 - keep) * f["mlp"] * share * density.get((layer, "mlp"), 1.0)
    return compute_ratio(cfg, seq_len, density) - saved / dense


def median_us(fn, repeat: int) -> float:
    """Median microseconds of fn() over repeat runs, after a few untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def gathered_down(h: torch.Tensor, w_t: torch.Tensor, k: int) -> torch.Tensor:
    """down(keep_largest(h)) without the zeros: (rows, F) activations, w_t the transposed down weight
    (F, d); each row's k largest |h| pick k rows of w_t, summed with the activations as weights."""
    idx = h.abs().topk(k, dim=-1).indices                           # (rows, k)
    return F.embedding_bag(idx, w_t, per_sample_weights=h.gather(-1, idx), mode="sum")   # (rows, d)


def down_speed(model, rows: int, keeps, repeat: int) -> dict:
    """{"dense": µs, q: µs} of one down projection on `rows` random activation rows, the mean over
    every layer's, run in turn: F.linear, against top-k + embedding_bag over the transposed weight."""
    ws = [block.mlp.down.weight.detach() for block in model.layers]     # (d, F) each
    ws_t = [w.t().contiguous() for w in ws]                              # (F, d): one row per neuron
    h = torch.randn(rows, ws[0].shape[1], dtype=ws[0].dtype, device=ws[0].device)
    out = {"dense": median_us(lambda: [F.linear(h, w) for w in ws], repeat) / len(ws)}
    for q in keeps:
        k = kept(h.shape[1], q)
        out[q] = median_us(lambda: [gathered_down(h, w_t, k) for w_t in ws_t], repeat) / len(ws)
    return out


def thinned_score(model, chunks, config, keep: float):
    """(NLL sum, tokens, compute ratio) of the model under --gates, its MLPs thinned to keep (1: in
    full). The gates' densities, and random gates' rates, are measured with the thinning on."""
    thin = sparse_mlp(model, keep, config["select"], block=config["block"]) if keep < 1 else nullcontext()
    with thin, gates_as(model, chunks, config["seq_len"], config["gates"], batch_size=config["batch_size"],
                        seed=config["seed"], target_compute=config["target_compute"]) as path:
        sums, stats = evaluate(model, chunks, config["batch_size"], path=path)
    blocks = model.cfg.ffn_dim // config["block"]
    share = kept(blocks, keep) / blocks                                 # what neuron_mask keeps
    return sums["nll"], sums["tokens"], neuron_compute(model.cfg, config["seq_len"], stats.density(), share,
                                                       config["select"])


class GatheredDown(nn.Module):
    """A down projection that reads only each token's round(keep·F) largest |h|: a single row (a
    decoding step) through gathered_down, so the skipped rows are never read; more rows masked."""

    def __init__(self, down: nn.Linear, keep: float):
        super().__init__()
        self.down, self.keep = down, keep
        self.w_t = down.weight.detach().t().contiguous()                  # (F, d)

    def forward(self, h):
        if h.shape[:-1].numel() > 1:
            return self.down(keep_largest(h, self.keep))
        return gathered_down(h.reshape(1, -1), self.w_t, kept(h.shape[-1], self.keep)).reshape(*h.shape[:-1], -1)


@contextmanager
def gathered(model, keep: float):
    """Every MLP's down projection a GatheredDown for the length of the block."""
    downs = [b.mlp.down for b in model.layers]
    for b, down in zip(model.layers, downs):
        b.mlp.down = GatheredDown(down, keep)
    try:
        yield
    finally:
        for b, down in zip(model.layers, downs):
            b.mlp.down = down


def decode_speed(model, keeps, prompt_len: int, new_tokens: int, repeat: int) -> dict:
    """Seconds per decoding step after a prompt of random ids and the first new token (untimed):
    the dense model against a copy of it whose down projections are GatheredDown, in lockstep
    (timing.decode_runs), medians of repeat runs; and whether the gathered steps pick the greedy
    tokens the masked thinning (sparse_mlp) picks."""
    idx = torch.randint(model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    thin = copy.deepcopy(model)                                      # its own weights, as a second model's
    out = {}
    for q in keeps:
        with gathered(thin, q):
            dense_s, thin_s, _ = decode_runs(model, idx, new_tokens - 1, repeat, paths=((model, True), (thin, True)))
            fast = generate(thin, idx, new_tokens)
        with sparse_mlp(model, q):
            masked = generate(model, idx, new_tokens)
        out[q] = dict(dense_s=dense_s / (new_tokens - 1), thinned_s=thin_s / (new_tokens - 1),
                      same_tokens=bool(torch.equal(fast, masked)))
    return out


def neuron_sparsity(config, model, tok, name) -> dict:
    model.requires_grad_(False).eval()
    if model.cfg.ffn_dim % config["block"]:
        raise ValueError(f"--block={config['block']} does not divide the MLP's {model.cfg.ffn_dim} neurons: "
                         "choose a divisor")
    chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    with forced(model, "open"), lora.disabled(model):                   # the dense base: every sublayer, no LoRA
        nll_dense = evaluate(model, chunks, config["batch_size"])[0]["nll"]
    rows = []
    for q in (1.0, *config["keeps"]):
        nll, n, compute = thinned_score(model, chunks, config, q)
        rows.append(dict(keep=q, compute_ratio=compute, ppl_ratio=math.exp((nll - nll_dense) / n)))
    print(f"{name}{' + ' + config['ckpt'] if config['ckpt'] else ''} on {config['text']} "
          f"({len(chunks)} x {config['seq_len']} tokens; dense perplexity {math.exp(nll_dense / n):.2f}; "
          f"{config['gates']} gates)")
    print(f"neurons chosen by {'|h|, for down' if config['select'] == 'down' else '|act(gate(x))|, for up and down'}"
          + (f", in blocks of {config['block']}" if config["block"] > 1 else ""))
    print("keep   compute   perplexity x dense")
    for r in rows:
        print(f"{r['keep']:4.2f}   {r['compute_ratio']:7.3f}   {r['ppl_ratio']:7.3f}")
    speed = {}
    if config["repeat"]:
        for batch in (1, config["seq_len"]):
            t = down_speed(model, batch, config["keeps"], config["repeat"] if batch == 1 else max(3, config["repeat"] // 10))
            speed[batch] = {str(k): v for k, v in t.items()}
            print(f"down projection, {batch} row(s): dense {t['dense']:.0f} us; "
                  + ", ".join(f"keep {q}: {t[q]:.0f} us ({t['dense'] / t[q]:.2f}x)" for q in config["keeps"]))
    steps = {}
    if config["repeat"] and config["new_tokens"] and config["select"] == "down" and config["block"] == 1 \
            and not config["ckpt"]:
        runs = max(1, config["repeat"] // 10)
        for q, t in decode_speed(model, config["keeps"], config["prompt_len"], config["new_tokens"], runs).items():
            steps[str(q)] = t
            print(f"decoding {config['new_tokens']} tokens after {config['prompt_len']}, keep {q}: "
                  f"{t['dense_s'] / t['thinned_s']:.2f}x the dense steps' speed "
                  f"({t['thinned_s'] * 1e3:.1f} against {t['dense_s'] * 1e3:.1f} ms); "
                  f"greedy tokens as the masked thinning's: {t['same_tokens']}")
    return dict(model=name, ckpt=config["ckpt"], text=config["text"], select=config["select"], block=config["block"],
                decode=steps,
                gates=config["gates"],
                seq_len=config["seq_len"], windows=len(chunks), tokens=n, rows=rows, down_us=speed,
                threads=torch.get_num_threads())


def check(config):
    check_ranges(config, RANGES)
    if not config["text"]:
        raise ValueError("research.neuron_sparsity needs --text=FILE, the text the perplexity is measured on")
    if not config["keeps"] or any(q <= 0 for q in config["keeps"]):
        raise ValueError("--keeps needs fractions in (0, 1], e.g. --keeps=0.5,0.4")
    if config["new_tokens"] == 1:
        raise ValueError("--new_tokens=1 leaves no decoding step to time (the first token prefills): use 0 or >= 2")
    if config["select"] not in SELECTS:
        raise ValueError(f"--select={config['select']!r}: choose one of {', '.join(SELECTS)}")
    if config["gates"] not in ("learned", "random", "peek"):
        raise ValueError(f"--gates={config['gates']!r}: choose learned, random or peek")
    if config["gates"] != "learned" and not config["ckpt"]:
        raise ValueError(f"--gates={config['gates']} needs a routed checkpoint (--ckpt): its densities, or its "
                         "substitutes")


main = research_main(DEFAULTS, check, neuron_sparsity)

if __name__ == "__main__":
    run_main(main)

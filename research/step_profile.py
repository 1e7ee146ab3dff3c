"""research/step_profile.py — where one step of train.py spends its time, against what the matmuls allow.

    python -m research.step_profile                          # the default recipe on SmolLM2-135M-Instruct
    python -m research.step_profile --init=checkpoints/smollm2-135m-instruct --steps=5 --json

The step is train.py's train_step at its defaults (grad_accum 1, ce 0, l1 0), rebuilt from the library:
the base in --dtype (auto: bfloat16 where native), routers on every sublayer with rank-8 substitutes,
LoRA rank 8 on wq,wk,wv,wo,gate,up,down, train.py's AdamW groups, and five labelled phases: teacher
forward (no_grad, LoRA and routers off) | student forward (masked path) | loss (the chunked KL with
its head matmuls and closed-form gradient, the L1 term) | backward | optimizer (clipping, AdamW,
zero_grad, the density and the controller's shift). The first three are distill_losses' lines at ce 0.
The batch is random token ids (BOS in front where the tokenizer adds one): the cost does not depend on
the text. The routers get random weights and one common bias (controller.set_density) so that --density
of the routed FLOPs run; the masked path runs every sublayer on every token whatever its gate, so the
cost depends neither on which tokens skip nor on how many.

It prints:
- step: the median seconds (time.perf_counter) of --steps steps after a warm-up; tokens/s counts
  batch_size * seq_len per step, as train.py does;
- phases: one more step under torch.profiler, each phase's seconds and share of it (the profiler
  slows the step: see "profiled"; the Python lines between phases keep the sum just under 1);
- ops: that step's self CPU time (in an op, not in the ops it calls) by class: matmul (mm, addmm, bmm,
  matmul, linear, baddbmm, addmv), attention (scaled_dot_product*, _flash*, _efficient*), copies/casts
  (copy_, to, _to_copy, clone, contiguous), the --top next ops by name, the other ops, and "outside
  ops" (Python, autograd and optimizer code between ops). They split the phases' time. On a GPU,
  self CPU time is launch time: read the phases and the floor there;
- matmul floor: every frozen weight's matmuls timed alone in the model's dtype, on the step's N rows:
  x @ W^T (forward) and g @ W (the input gradient). Each weight runs forward twice (teacher, student;
  the head: both logits in the loss) and backward once (a frozen weight needs no weight gradient),
  so floor = 2 forward + backward. Left out: LoRA, routers, substitutes, attention scores (small); the
  step skips the backward of layer 0's q, k, v (their input needs no gradient), the floor counts it.
  GFLOP/s = the floor's FLOPs (2 N in out per matmul) / its time; step / floor = 1 would mean the step
  runs at its matmuls' speed, 3 that two thirds of it goes elsewhere.

Every option below is --key=value or --key value (--help lists them); --json prints the results as
one JSON object on the last line.
"""
import json
import statistics
from contextlib import contextmanager
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import lora
import router
from checkpoint import trained_parameters
from configurator import AT_LEAST_0, AT_LEAST_1, FRACTION, Range, check_ranges, overrides, run_main
from controller import DensityController, set_density
from data.prepare import with_bos
from distill import DistillLoss
from flops import skip_savings
from generate import now
from load_weights import load

DEFAULTS = dict(
    init="smollm2-135m-instruct",  # base model: preset name or HF-format folder
    batch_size=2,
    seq_len=256,                   # text tokens per row (BOS goes in front where the tokenizer adds one)
    density=0.87,                  # FLOP-weighted share of the routed work the gates keep (train.py's target)
    steps=3,                       # timed steps after one warm-up; the median is reported
    repeat=5,                      # timed runs of the matmul floor; the median is reported
    top=4,                         # ops listed by name after the three classes
    threads=0,                     # torch.set_num_threads; 0 = torch's default
    seed=1337,
    dtype="auto",                  # auto = bfloat16 where native, else float32 (train.py's)
    device="cpu",
    json=False,                    # print the results as one JSON object on the last line
)
RANGES = dict(batch_size=AT_LEAST_1, seq_len=Range(2), density=FRACTION, steps=AT_LEAST_1, repeat=AT_LEAST_1,
              top=AT_LEAST_0, threads=AT_LEAST_0, seed=AT_LEAST_0)
# train.py's defaults for what the step trains; its learning rates do not change the step's cost
RECIPE = dict(substitute=8, lora_rank=8, lora_alpha=16.0, lr=2e-3, router_lr=3e-3, grad_clip=1.0)
PHASES = ("teacher forward", "student forward", "loss", "backward", "optimizer")
PROJECTIONS = (("attn", ("wq", "wk", "wv", "wo")), ("mlp", ("gate", "up", "down")))
MATMUL = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "addmv"}
COPIES = {"copy_", "to", "_to_copy", "clone", "contiguous"}


@contextmanager
def phase(name: str, device: str):
    """A labelled phase of the step; on a GPU it also waits for the phase's queued work."""
    with record_function(name):
        yield
        now(device)


class Step:
    """train.py's train_step for one fixed batch x (B, T); calling it runs one step and returns its seconds."""

    def __init__(self, model, x, weights: dict, density: float, device: str):
        self.model, self.x, self.weights, self.device = model, x, weights, device
        self.params = list(trained_parameters(model).values())
        self.opt = make_optimizer(model)
        self.ctrl = DensityController((density,), stage_iters=1, anneal=0.1, gain=0.5)
        self.it, self.kl, self.density = 0, None, None

    def __call__(self) -> float:
        model, x = self.model, self.x
        t0 = now(self.device)
        with phase("teacher forward", self.device), torch.no_grad(), lora.disabled(model):
            h_t, _ = model(x, routers_off=True, return_hidden=True)              # (B, T, d)
        with phase("student forward", self.device):
            h_s, records = model(x, masked=True, return_hidden=True)             # (B, T, d), gate records
        with phase("loss", self.device):
            d = h_s.shape[-1]
            kl, _ = DistillLoss.apply(h_s.reshape(-1, d), h_t.reshape(-1, d), model.head_weight(), None,
                                      model.cfg.final_softcap)
            # train.py's loss at ce = l1 = 0: the L1 term is built and backpropagated all the same
            loss = kl / x.numel() + 0.0 * router.l1_loss(records, self.weights)
        with phase("backward", self.device):
            loss.backward()
        with phase("optimizer", self.device):
            float(torch.nn.utils.clip_grad_norm_(self.params, RECIPE["grad_clip"]))   # read, as train.py does
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.kl, self.density = loss.item(), router.GateStats(records).mean(weights=self.weights)
            self.ctrl.update(model, self.it, records, self.weights)
        self.it += 1
        return now(self.device) - t0


def make_optimizer(model) -> torch.optim.AdamW:
    """train.py's AdamW: router weights at router_lr / sqrt(d), router biases, substitutes (their A and
    b), LoRA."""
    rs = [r for _, _, r in router.routers(model)]
    groups = [dict(params=[r.proj.weight for r in rs], lr=RECIPE["router_lr"] / model.cfg.dim ** 0.5),
              dict(params=[r.proj.bias for r in rs], lr=RECIPE["router_lr"]),
              dict(params=[p for _, _, s in router.substitutes(model) for p in s.parameters() if p.requires_grad],
                   lr=RECIPE["lr"]),
              dict(params=lora.parameters(model), lr=RECIPE["lr"])]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=0.0)


def build(config: dict) -> Step:
    """The default recipe on --init, a random batch, and gates that keep --density of the routed FLOPs."""
    model, tok = load(config["init"], config["dtype"], config["device"])
    T = config["seq_len"] + tok.adds_bos
    if T > model.cfg.max_seq_len:
        raise ValueError(f"--seq_len={config['seq_len']}{' + BOS' if tok.adds_bos else ''} is over the model's "
                         f"context of {model.cfg.max_seq_len}: lower --seq_len")
    gen = torch.Generator().manual_seed(config["seed"])
    ids = torch.randint(model.cfg.vocab_size, (config["batch_size"], config["seq_len"]), generator=gen)
    x = with_bos(ids, tok.bos_id if tok.adds_bos else None).to(config["device"])     # (B, T)
    torch.manual_seed(config["seed"])                                                 # LoRA A, router weights
    router.add_routers(model, "sublayer", "all", substitute=RECIPE["substitute"])
    lora.inject(model, lora.TARGETS, RECIPE["lora_rank"], RECIPE["lora_alpha"])
    for name, p in trained_parameters(model).items():
        p.requires_grad_(not name.endswith("_skip.up"))    # as train.build: a substitute's B stays as fitted
    with torch.no_grad():                      # logits that differ by token, so that some tokens skip
        for _, _, r in router.routers(model):
            r.proj.weight.normal_(0, model.cfg.dim ** -0.5)
    weights = skip_savings(model.cfg, T)
    set_density(model, [x], weights, config["density"])
    return Step(model, x, weights, config["density"], config["device"])


def op_class(name: str) -> str:
    """The class of a profiler event by its name; an op outside the three classes keeps its name."""
    if not name.startswith("aten::"):
        return "outside ops"
    op = name[len("aten::"):]
    if op in MATMUL:
        return "matmul"
    if op.lstrip("_").startswith(("scaled_dot_product", "flash", "efficient")):
        return "attention"
    return "copies/casts" if op in COPIES else name


def profile_step(step: Step, top: int) -> tuple:
    """One step under the profiler: its seconds, {phase: (s, share)}, {op class: (s, share)}."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = step()
    events = prof.key_averages()
    spans = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    self_s = defaultdict(float)
    for e in events:
        self_s[op_class(e.key)] += e.self_cpu_time_total / 1e6
    classes = ("matmul", "attention", "copies/casts")
    named = sorted((k for k in self_s if k.startswith("aten::")), key=self_s.get, reverse=True)
    ops = {k: self_s[k] for k in classes + tuple(named[:top])}
    ops["other ops"] = sum(self_s[k] for k in named[top:])
    ops["outside ops"] = self_s["outside ops"]
    share = lambda d: {k: dict(s=v, share=v / seconds) for k, v in d.items()}      # noqa: E731
    return seconds, share({p: spans.get(p, 0.0) for p in PHASES}), share(ops)


def frozen_weights(model) -> list:
    """Every frozen weight a step multiplies by: the seven projections of every block, then the head."""
    return [getattr(getattr(b, part), name).weight for b in model.layers
            for part, names in PROJECTIONS for name in names] + [model.head_weight()]


@torch.no_grad()
def matmul_floor(weights: list, rows: int, repeat: int, device: str) -> dict:
    """The seconds of one step's frozen-weight matmuls alone: 2 x (x @ W^T) + 1 x (g @ W) per weight,
    on rows rows in the weights' dtype, in the step's order (each weight read as in the step)."""
    dtype = weights[0].dtype
    x = {n: torch.randn(rows, n, dtype=dtype, device=device) for n in {w.shape[1] for w in weights}}
    g = {n: torch.randn(rows, n, dtype=dtype, device=device) for n in {w.shape[0] for w in weights}}

    def forward():
        for w in weights:
            torch.mm(x[w.shape[1]], w.t())          # (N, in) @ (in, out)

    def backward():
        for w in weights:
            torch.mm(g[w.shape[0]], w)              # (N, out) @ (out, in): the input gradient

    def median_s(run):
        run()                                       # warm-up
        times = []
        for _ in range(repeat):
            t0 = now(device)
            run()
            times.append(now(device) - t0)
        return statistics.median(times)

    fwd, bwd = median_s(forward), median_s(backward)
    gflop = 3 * sum(2 * rows * w.numel() for w in weights) / 1e9
    floor = 2 * fwd + bwd
    return dict(matmul_forward_s=fwd, matmul_backward_s=bwd, matmul_floor_s=floor, matmul_gflop=gflop,
                matmul_gflops=gflop / floor)


def report(out: dict):
    print(f"{out['init']}, {out['dtype']} on {out['device']} ({out['threads']} threads): "
          f"{out['batch_size']} x {out['seq_len']} tokens, density {out['density']:.3f}")
    print(f"step: {out['step_s']:.3f} s (median of {', '.join(f'{t:.3f}' for t in out['step_s_all'])}), "
          f"{out['tokens_per_s']:.0f} tokens/s; profiled step {out['profiled_step_s']:.3f} s")
    for title, rows in (("phase", out["phases"]), ("op class (self CPU time)", out["ops"])):
        print(f"\n{title:<40} {'seconds':>8} {'share':>7}")
        for name, r in rows.items():
            print(f"{name:<40} {r['s']:8.3f} {100 * r['share']:6.1f}%")
    print(f"\nmatmul floor: {out['matmul_floor_s']:.3f} s = 2 x {out['matmul_forward_s']:.3f} s forward "
          f"+ {out['matmul_backward_s']:.3f} s backward, {out['matmul_gflop']:.2f} GFLOP at "
          f"{out['matmul_gflops']:.1f} GFLOP/s; step / floor = {out['step_over_floor']:.2f}")


def main(argv) -> dict:
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    check_ranges(config, RANGES)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    step = build(config)
    step()                                                        # warm-up
    times = [step() for _ in range(config["steps"])]
    profiled_s, phases, ops = profile_step(step, config["top"])
    floor = matmul_floor(frozen_weights(step.model), step.x.numel(), config["repeat"], config["device"])
    step_s = statistics.median(times)
    out = dict(init=config["init"], dtype=str(step.model.tok_emb.weight.dtype).removeprefix("torch."),
               device=config["device"], threads=torch.get_num_threads(), batch_size=config["batch_size"],
               seq_len=config["seq_len"], density=step.density, step_s=step_s, step_s_all=times,
               tokens_per_s=config["batch_size"] * config["seq_len"] / step_s, profiled_step_s=profiled_s,
               phases=phases, ops=ops, **floor, step_over_floor=step_s / floor["matmul_floor_s"])
    report(out)
    if config["json"]:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_main(main)

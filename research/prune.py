"""prune.py — the static baselines: whole sublayers, or whole blocks, removed for every token.

Per-token routing has to beat the simplest way to spend less compute: drop the sublayers that
matter least, for every token, and heal the rest with the same LoRA budget. Three rankings
decide what goes first ("least harm" first):

    kl     remove each routed sublayer alone and measure the mean KL(dense || pruned) of the
           next-token distributions on calibration windows (one forward pass per sublayer);
    bi     Block Influence per sublayer (ShortGPT's measure, one sublayer at a time): the mean
           over tokens of 1 - cos(h, h + f(x)), how much the sublayer turns the residual stream;
    layer  ShortGPT proper: the Block Influence of each whole block, 1 - cos(h_in, h_out),
           and a removal takes both sublayers of the block.

    scores = rank(model, batches, by="kl")                    # {(layer, kind): harm}
    removed = removal_set(model.cfg, scores, seq_len, 0.9)    # least harm first, to compute 0.9
    set_static(model, removed)                                # routers become constants

Sublayers are removed until flops.compute_ratio falls to the target, so the baseline lands at
or just below the compute of the routed model it is compared with. A removed sublayer is a
router that always says skip (weight 0, bias -FIXED_LOGIT), a kept one a router that always
says compute (+FIXED_LOGIT): the result is an ordinary checkpoint that compaction, evaluate.py,
bench.py and export.py take unchanged. The attention sinks (position 0, BOS) still compute
every sublayer, because router.decide pins them, as for every routed model they are compared
with. train.py --prune=kl|bi|layer --prune_compute=R does all of this, then trains LoRA only;
with --prune_routed=True it closes only the removed sublayers and routes the rest per token with
the usual recipe (a hybrid of static removal and routing). train.py imports this file only when
--prune is given (train.baselines).
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import controller
import gates
import lora
import router
from checkpoint import write_text_atomic
from flops import compute_ratio

RANKINGS = ("kl", "bi", "layer")
FIXED_LOGIT = router.SINK_LOGIT   # far from 0: a gate that never changes and has no gradient
HEAD_ROWS = 256                   # logits made this many tokens at a time: (rows, V), not (B*T, V)


def turn(before: torch.Tensor, after: torch.Tensor) -> float:
    """Block Influence: mean over tokens of 1 - cos(before, after), both (B, T, d); the sinks at
    position 0 (huge, and never removed) are left out."""
    return float((1 - F.cosine_similarity(before[:, 1:].float(), after[:, 1:].float(), dim=-1)).mean())


def influence(model, batches, whole_blocks: bool) -> dict:
    """Block Influence of every routed sublayer ({(layer, kind): BI}), or with whole_blocks of
    every block ({(layer, "block"): BI}), averaged over the batches."""
    scores = {}
    for x in batches:
        with lora.disabled(model):
            io = controller.sublayer_io(model, x)
        for (layer, kind), (h, _, y) in io.items():
            if not whole_blocks:                           # the sublayer: h before it, h + y after
                key, before = (layer, kind), h
            elif kind == "mlp":                            # the block: before its attention, after its MLP
                key, before = (layer, "block"), io[(layer, "attn")][0]
            else:
                continue
            scores[key] = scores.get(key, 0.0) + turn(before, h + y) / len(batches)
    return scores


@torch.no_grad()
def mean_kl(model, h_ref: torch.Tensor, h: torch.Tensor) -> float:
    """Mean KL(p_ref || p) over tokens of the next-token distributions of final hidden states
    h_ref and h (N, d), made HEAD_ROWS tokens at a time."""
    total = 0.0
    for rows in torch.arange(len(h)).split(HEAD_ROWS):
        logp_ref = F.log_softmax(model.logits(h_ref[rows]).float(), dim=-1)     # (R, V)
        logp = F.log_softmax(model.logits(h[rows]).float(), dim=-1)
        total += float(F.kl_div(logp, logp_ref, log_target=True, reduction="sum"))
    return total / len(h)


@torch.no_grad()
def removal_kl(model, batches) -> dict:
    """{(layer, kind): mean KL(dense || dense without that one sublayer)} over the batches; the
    sublayer is removed by forcing its router to keep no token (the sinks still compute)."""
    with lora.disabled(model):
        dense = [model(x, routers_off=True, return_hidden=True)[0].flatten(0, 1) for x in batches]   # (B*T, d)
        scores = {}
        for layer, kind, _ in tqdm(router.routers(model), desc="ranking sublayers by KL", leave=False):
            with gates.forced(model, {(l, k): 0.0 if (l, k) == (layer, kind) else "open"
                                      for l, k, _ in router.routers(model)}):
                h = [model(x, return_hidden=True)[0].flatten(0, 1) for x in batches]
            scores[(layer, kind)] = sum(mean_kl(model, r, s) for r, s in zip(dense, h)) / len(batches)
    return scores


def rank(model, batches, by: str) -> dict:
    """The harm each removable unit does, by the ranking `by` (see the top of this file):
    {(layer, "attn"|"mlp"|"block"): score}, lower = removed first."""
    if by not in RANKINGS:
        raise ValueError(f"unknown --prune={by!r}: choose one of {', '.join(RANKINGS)}")
    if model.cfg.route != "sublayer":
        raise ValueError(f"static pruning sets one router per sublayer: use --route=sublayer (got {model.cfg.route!r})")
    return removal_kl(model, batches) if by == "kl" else influence(model, batches, whole_blocks=by == "layer")


def removal_set(cfg, scores: dict, seq_len: int, target_compute: float) -> list:
    """The sublayers to remove, least harmful first, until the compute ratio at seq_len is at
    most target_compute: [(layer, kind)]; a block's score removes both of its sublayers."""
    removed, ratio = [], compute_ratio(cfg, seq_len)
    for layer, kind in sorted(scores, key=scores.get):
        if ratio <= target_compute:
            break
        removed += [(layer, "attn"), (layer, "mlp")] if kind == "block" else [(layer, kind)]
        ratio = compute_ratio(cfg, seq_len, {key: 0.0 for key in removed})
    if ratio > target_compute:
        raise ValueError(f"removing every sublayer does not reach --prune_compute={target_compute}: raise it")
    return removed


@torch.no_grad()
def close(model, removed):
    """Make the routers of the removed sublayers skip every token (but the sinks), for good:
    weight 0, bias -FIXED_LOGIT (sigmoid' ~ 0, so training does not move them)."""
    gone = set(removed)
    for layer, kind, r in router.routers(model):
        if (layer, kind) in gone:
            r.proj.weight.zero_()
            r.proj.bias.fill_(-FIXED_LOGIT)


@torch.no_grad()
def set_static(model, removed):
    """Make every router a constant: skip for every token in the removed sublayers, compute in
    the others (the sinks still compute everywhere; see router.decide)."""
    for _, _, r in router.routers(model):
        r.proj.weight.zero_()
        r.proj.bias.fill_(FIXED_LOGIT)
    close(model, removed)


def read_removed(out_dir) -> set:
    """The sublayers a --prune run removed, from its out_dir/prune.json: {(layer, kind)}."""
    file = Path(out_dir) / "prune.json"
    try:
        return {(layer, kind) for layer, kind in json.loads(file.read_text())["removed"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read what this run removed from {file} ({e}): a --prune run keeps it "
                         "beside its checkpoints; put it back, or start the run again in a new --out_dir") from None


def read_scores(path: str, ranking: str) -> dict:
    """The scores an earlier --prune run wrote to its prune.json (a file or its out_dir), so that
    one ranking serves several --prune_compute targets: {(layer, kind): score}."""
    file = Path(path) / "prune.json" if Path(path).is_dir() else Path(path)
    try:
        record = json.loads(file.read_text())
        scores = {(row["layer"], row["kind"]): row["score"] for row in record["scores"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the ranking in --prune_scores={path} ({e}): pass the prune.json, or the "
                         "out_dir, of an earlier train.py --prune run") from None
    if record.get("ranking") != ranking:
        raise ValueError(f"--prune_scores={path} holds the {record.get('ranking')!r} ranking, not --prune={ranking}")
    return scores

def check_config(config: dict):
    """train.py's --prune flags, checked before anything loads."""
    if config["prune"] not in RANKINGS:
        raise ValueError(f"--prune={config['prune']!r} is not a ranking: choose one of {', '.join(RANKINGS)}")
    if config["fsdp"]:
        raise ValueError("--prune is not tested under --fsdp: run the static baselines without it (DDP or one process)")
    if config["route"] != "sublayer":
        raise ValueError("--prune sets one gate per sublayer: use --route=sublayer")
    if not config["prune_routed"] and len(config["target_density"]) > 1:
        raise ValueError("--prune without --prune_routed has no density to stage: give no staged --target_density")


def prune_routers(run, batches):
    """--prune: rank the sublayers on the fit windows, remove the least harmful ones for every
    token until the compute ratio is --prune_compute (see the top of this file), freeze the routers so that only
    LoRA trains; write out_dir/prune.json (the scores and what was removed). With --prune_routed
    only the removed sublayers' routers are closed, the others keep their fit and train.
    Returns the removed sublayers."""
    config, model = run.config, run.model
    scores = (read_scores(config["prune_scores"], config["prune"]) if config["prune_scores"]
              else rank(model, batches, config["prune"]))
    window = config["seq_len"] + (run.data.bos is not None)
    removed = removal_set(model.cfg, scores, window, config["prune_compute"])
    if config["prune_routed"]:
        close(model, removed)
    else:
        set_static(model, removed)                  # frozen by train.build(): AdamW skips them
    if run.rank == 0:
        rows = [dict(layer=l, kind=k, score=v) for (l, k), v in sorted(scores.items(), key=lambda kv: kv[1])]
        ratio = compute_ratio(model.cfg, window, {key: 0.0 for key in removed})
        record = dict(ranking=config["prune"], base=config["base"], compute_ratio=ratio, removed=removed, scores=rows)
        write_text_atomic(run.out_dir / "prune.json", json.dumps(record, indent=1))    # whole or not at all
        print(f"--prune={config['prune']}: removed {len(removed)} sublayers for every token, "
              f"compute ratio {ratio:.3f}")
    return removed

"""research/studies.py — what skips: gate density by token class, by position in the window, and by layer.

    python -m research.studies --ckpt=out --text=data/heldout/python_docs.txt --by_class --plot=classes.svg
    python -m research.studies --ckpt=out --text=data/heldout/python_docs.txt --by_position --seq_len=2048

The sparse model runs over the text's windows (its --gates, as evaluate.py takes them: gates.py) and
this file counts, for every group of tokens, how many of them computed each routed sublayer; the
tables are printed, and with --plot a heatmap of both is drawn (research/plots.py).

A token's class comes from its decoded piece: the text it adds after the token before it,
decode(prev, id) minus decode(prev), so a space that a tokenizer writes as its own mark (GPT-2's
"Ġ", SentencePiece's "▁") or adds between pieces is the piece's leading space. The classes
overlap; the six *kinds* (whitespace … other) split the tokens that are not sinks:
  sink               position 0 of a window and every BOS: they always compute (router.py),
                     so they are in no other class;
  whitespace         the piece is only whitespace (spaces, tabs, newlines);
  digit              the piece without its spaces is one or more decimal digits;
  punctuation        the piece without its spaces is punctuation or symbols only (Unicode P*, S*);
  word start         the piece without its spaces begins with a letter, and the piece itself
                     begins with whitespace or the piece before it does not end in a letter
                     or digit (the first piece of a word: " numbers", "x" after "(");
  word continuation  the piece begins with a letter and the piece before it ends in a letter
                     or digit ("ing" after " runn");
  other              the rest: mixed pieces ("2x"), partial UTF-8 bytes (decoded as U+FFFD);
  newline            the piece holds a line break (with byte-level BPE, "\\n" and "\\n   "
                     are whitespace pieces);
  function word      a word start that is a whole word of FUNCTION_WORDS (lower-cased; the next
                     piece is not a word continuation: " the" of " theory" is not one);
  code / prose       code is every line inside a ``` fence (the fence lines included) and every
                     doctest block: from a line that starts with ">>>" (after indentation) up
                     to the next blank line, its output lines included; prose is the rest. A
                     token belongs to the line its piece ends in. Indentation alone is not
                     taken for code: Python's docs indent their prose too.
  all                every token.
Position buckets: 0, 1-15, 16-63, 64-255, 256-511, 512-1023, then doubling, cut at the window
length (positions count BOS when the tokenizer adds one).

For each group: tokens (how many input positions of the windows are in it), the FLOP-weighted
density (share of the routed sublayers' skippable FLOPs these tokens ran, weights
flops.skip_savings: train.py's density), the attention and MLP densities, and density per layer.
Position buckets also get their compute ratio (flops.compute_ratio of that bucket's densities,
for queries at those positions, so with the attention scores at their real context): it shows
why a model's compute ratio grows with the window when its attention rarely skips. It is exact
for kv="all"; for kv="kept" it takes the bucket's attention density for the keys as well.

Every option below is --key=value or --key value (python -m research.studies --help lists them).
--json prints the results as one JSON object on the last line.
"""
import unicodedata

import torch
from tqdm import tqdm

import router
from configurator import AT_LEAST_0, AT_LEAST_1, Range, check_ranges, run_main
from flops import compute_ratio, skip_savings
from gates import gates_as
from research.plots import heatmap_svg, write_plot
from scoring import check_gates, read_text, research_main, windows

DEFAULTS = dict(
    init="smollm2-135m-instruct",   # model: a preset name or a Hugging Face-format folder (with --ckpt: its base)
    ckpt="",                        # a train.py out_dir: study its sparse model
    text="",                        # the text file to run over
    by_class=False,                 # density by token class
    by_position=False,              # density by position in the window
    plot="",                        # write a heatmap of the groups' density per layer to this .svg file
    seq_len=512,                    # window length in text tokens (BOS not counted)
    batch_size=4,                   # windows per forward pass
    max_chunks=0,                   # only the first N windows; 0 = all
    gates="learned",                # learned | random | open | peek | peek_lora (evaluate.py's)
    path="compact",                 # compact (skipped work removed) | masked (training path)
    target_compute=0.9,             # --gates=peek: the compute ratio its threshold aims at
    seed=1337,                      # for --gates=random
    dtype="float32",                # float32 | bfloat16 | float16
    device="cpu",                   # cpu | cuda | cuda:1 | mps
    json=False,                     # print the results as one JSON object on the last line
)
RANGES = dict(seq_len=AT_LEAST_1, batch_size=AT_LEAST_1, max_chunks=AT_LEAST_0, seed=AT_LEAST_0,
              target_compute=Range(0, 1, open_lo=True))
KINDS = ("whitespace", "digit", "punctuation", "word start", "word continuation", "other")
CLASSES = ("all", "sink") + KINDS + ("newline", "function word", "code", "prose")
FUNCTION_WORDS = frozenset("""
a an the this that these those some any no every each all both
of to in on at by for with from into onto about over under after before between through
and or but nor so yet if then than as because while when where whether
i me my we us our you your he him his she her it its they them their
is are was were be been being am do does did have has had
will would can could shall should may might must not there here what which who whom how
""".split())


# ----------------------------------------------------------------------------------------------
# Token classes from decoded pieces
# ----------------------------------------------------------------------------------------------

def pieces(tok, ids) -> list:
    """The text each token of ids adds after the one before it (see the top of this file)."""
    out = [tok.decode(ids[:1])] if len(ids) else []
    for prev, cur in zip(ids, ids[1:]):
        before = tok.decode([prev])
        pair = tok.decode([prev, cur])
        out.append(pair[len(before):] if pair.startswith(before) else tok.decode([cur]))
    return out


def kind(piece: str, prev: str) -> str:
    """Which of KINDS a piece is, given the piece before it ("" at the start of the text)."""
    core = piece.strip()
    if not core:
        return "whitespace"
    if "\ufffd" in core:
        return "other"
    if core.isdecimal():
        return "digit"
    if all(unicodedata.category(c)[0] in "PS" for c in core):
        return "punctuation"
    if core[0].isalpha():
        starts = piece[0].isspace() or not prev or not prev[-1].isalnum()
        return "word start" if starts else "word continuation"
    return "other"


def code_lines(lines) -> list:
    """One bool per line: is it code (a ``` fence or a doctest block, see the top of this file)?"""
    out, fenced, doctest = [], False, False
    for line in lines:
        text = line.strip()
        if text.startswith("```"):
            out.append(True)
            fenced = not fenced
            continue
        doctest = bool(text) and (doctest or text.startswith(">>>"))
        out.append(fenced or doctest)
    return out


def classify(ps) -> torch.Tensor:
    """(N, len(CLASSES)) bool: the classes of consecutive pieces ps of one text, none a sink."""
    kinds = [kind(p, ps[i - 1] if i else "") for i, p in enumerate(ps)]
    line_code = code_lines("".join(ps).split("\n"))
    rows, line = [], 0                                                # line: where the piece starts
    for i, (p, k) in enumerate(zip(ps, kinds)):
        last = line + p[:-1].count("\n")                              # the line the piece ends in
        line += p.count("\n")
        nxt = kinds[i + 1] if i + 1 < len(ps) else ""
        function = k == "word start" and p.strip().lower() in FUNCTION_WORDS and nxt != "word continuation"
        member = {"all", k, "code" if line_code[last] else "prose"}
        member |= {"newline"} if "\n" in p else set()
        member |= {"function word"} if function else set()
        rows.append([c in member for c in CLASSES])
    return torch.tensor(rows, dtype=torch.bool).view(len(ps), len(CLASSES))


def window_classes(tok, chunks: torch.Tensor, bos: bool) -> torch.Tensor:
    """(N, L, len(CLASSES)) bool for scoring.windows' chunks (N, L): the text is classified once as
    a whole (the windows are consecutive), then position 0 and BOS become sinks only."""
    text = chunks[:, 1:] if bos else chunks                           # (N, L') the text's own tokens
    member = classify(pieces(tok, text.flatten().tolist())).view(*text.shape, len(CLASSES))
    if bos:
        member = torch.cat([torch.zeros_like(member[:, :1]), member], dim=1)
    sink = torch.zeros(member.shape[:2], dtype=torch.bool)
    sink[:, 0] = True
    if tok.bos_id is not None:
        sink |= chunks == tok.bos_id
    member[sink] = False
    member[..., CLASSES.index("all")] = True
    member[..., CLASSES.index("sink")] = sink
    return member


# ----------------------------------------------------------------------------------------------
# Position buckets
# ----------------------------------------------------------------------------------------------

def position_buckets(T: int) -> list:
    """[(first, end)] position ranges covering 0..T-1: 0, 1-15, 16-63, 64-255, 256-511, then doubling."""
    edges = [0, 1, 16, 64, 256, 512]
    while edges[-1] < T:
        edges.append(edges[-1] * 2)
    return [(lo, min(hi, T)) for lo, hi in zip(edges, edges[1:]) if lo < T]


def bucket_name(lo: int, end: int) -> str:
    return f"{lo}" if end == lo + 1 else f"{lo}-{end - 1}"


def position_members(T: int) -> torch.Tensor:
    """(T, buckets) bool: which bucket each position 0..T-1 falls in."""
    pos = torch.arange(T)
    return torch.stack([(pos >= lo) & (pos < end) for lo, end in position_buckets(T)], dim=1)


# ----------------------------------------------------------------------------------------------
# Counting gates per group
# ----------------------------------------------------------------------------------------------

def add_groups(stats: list, records, member: torch.Tensor):
    """Count a forward pass's gate records into one router.GateStats per group.

    stats: one GateStats per group; records: GateRecords with keep (B, T); member (B, T, G) bool.
    """
    if not records:
        return
    keep = torch.stack([r.keep for r in records], dim=-1).cpu().double()   # (B, T, S), counted on the CPU
    m = member.cpu().double()
    kept = torch.einsum("btg,bts->gs", m, keep).round().long().tolist()   # (G, S) kept per group
    n = m.sum((0, 1)).long().tolist()                                  # (G,) tokens per group
    for g, st in enumerate(stats):
        for s, r in enumerate(records):
            st.kept[(r.layer, r.kind)] += kept[g][s]
            st.slots[(r.layer, r.kind)] += n[g]


def group_row(name: str, st: router.GateStats, tokens: int, total: int, cfg, seq_len: int) -> dict:
    """One group's densities (see the top of this file); None where it has no tokens."""
    L = cfg.n_layers
    if tokens == 0:
        return dict(name=name, tokens=0, share=0.0, density=None, density_attn=None, density_mlp=None,
                    per_layer=None)
    return dict(name=name, tokens=tokens, share=tokens / total,
                density=st.mean(weights=skip_savings(cfg, seq_len)),
                density_attn=st.mean("attn", n_layers=L), density_mlp=st.mean("mlp", n_layers=L),
                per_layer=st.per_layer(L))


@torch.no_grad()
def study(model, chunks, classes=None, batch_size=4, path="compact") -> dict:
    """Density per token class (classes: window_classes of chunks, or None) and per position
    bucket, of the model as its gates are set now, over the windows chunks (N, L).

    Returns {"classes": [row per class], "positions": [row per bucket, with compute_ratio]}.
    """
    if not router.routers(model):
        raise ValueError("this model has no routers, so nothing skips: pass --ckpt=OUT_DIR, a folder "
                         "export.py wrote, or --gates=peek")
    device, cfg = model.tok_emb.weight.device, model.cfg
    T = chunks.shape[1] - 1                                            # input positions per window
    by_pos = position_members(T)                                       # (T, P)
    class_stats = [router.GateStats() for _ in CLASSES]
    pos_stats = [router.GateStats() for _ in range(by_pos.shape[1])]
    for i in tqdm(range(0, len(chunks), batch_size), desc="what skips", leave=False):
        x = chunks[i:i + batch_size, :-1].to(device)                   # (B, T)
        records = model(x, masked=path == "masked", return_hidden=True)[1]
        if classes is not None:
            add_groups(class_stats, records, classes[i:i + batch_size, :-1])
        add_groups(pos_stats, records, by_pos.expand(len(x), -1, -1))
    out = {}
    if classes is not None:
        counts = classes[:, :-1].sum((0, 1)).tolist()
        out["classes"] = [group_row(c, st, n, counts[0], cfg, T) for c, st, n in zip(CLASSES, class_stats, counts)]
    counts = (by_pos.sum(0) * len(chunks)).tolist()
    out["positions"] = []
    for (lo, end), st, n in zip(position_buckets(T), pos_stats, counts):
        row = group_row(bucket_name(lo, end), st, n, T * len(chunks), cfg, T)
        row["compute_ratio"] = compute_ratio(cfg, end, st.density(), queries=end - lo)
        out["positions"].append(row)
    return out


# ----------------------------------------------------------------------------------------------
# Output: a text table (the heatmap: research/plots.py)
# ----------------------------------------------------------------------------------------------

def table(rows, title: str) -> str:
    """The rows as a Markdown table: tokens, share, FLOP-weighted density, attention and MLP."""
    ratio = "compute_ratio" in rows[0]
    lines = [f"| {title} | tokens | share | density (FLOP-weighted) | attn | mlp |" + (" compute ratio |" * ratio),
             "|---|---|---|---|---|---|" + "---|" * ratio]
    for r in rows:
        cells = ["–"] * 3 if r["tokens"] == 0 else [f"{r[k]:.3f}" for k in ("density", "density_attn", "density_mlp")]
        extra = f" {r['compute_ratio']:.3f} |" if ratio else ""
        lines.append(f"| {r['name']} | {r['tokens']} | {r['share']:.3f} | " + " | ".join(cells) + " |" + extra)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# What skips, under --gates
# ----------------------------------------------------------------------------------------------

def main_study(config, model, tok, name) -> dict:
    """What skips, as tables (and with --plot, a heatmap)."""
    chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    classes = window_classes(tok, chunks, tok.adds_bos) if config["by_class"] else None
    with gates_as(model, chunks, config["seq_len"], config["gates"], config["path"], config["batch_size"],
                  config["seed"], config["target_compute"]) as path:
        found = study(model, chunks, classes, config["batch_size"], path)
    if not config["by_position"]:
        del found["positions"]
    out = dict(model=name, ckpt=config["ckpt"] or None, gates=config["gates"], path=path, text=config["text"],
               seq_len=config["seq_len"], windows=len(chunks), **found)
    print(f"{name}, gates {config['gates']}: {len(chunks)} windows of {config['seq_len']} tokens")
    groups = [(title, out[key]) for key, title in (("classes", "token class"), ("positions", "position in the window"))
              if key in out]
    for title, rows in groups:
        print(table(rows, title))
    if config["plot"]:
        title = f"{name}: where it skips ({config['gates']} gates, {config['seq_len']}-token windows)"
        write_plot(config["plot"], heatmap_svg(groups, model.cfg.n_layers, title))
    return out


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def check(config):
    if not config["text"]:
        raise ValueError("research.studies needs --text=FILE, the text whose tokens it groups")
    if not (config["by_class"] or config["by_position"]):
        raise ValueError("nothing to study: pass --by_class, --by_position or both")
    check_ranges(config, RANGES)
    check_gates(config)


main = research_main(DEFAULTS, check, main_study)


if __name__ == "__main__":
    run_main(main)

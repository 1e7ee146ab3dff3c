"""export.py — a train.py checkpoint as a standalone sparse model folder, no base model needed.

    python export.py --ckpt=out --out=sparse-model/
    python sample.py --init=sparse-model/ --prompt="The for statement"     # the sparse model
    python evaluate.py --init=sparse-model/ --text=data/heldout/python_docs.txt

A checkpoint of train.py holds only routers, skip substitutes and LoRA, and works next to the exact base folder
it was trained from. The exported folder stands alone, in the layout of a Hugging Face model:

    model.safetensors          every tensor of the base, in its HF name and dtype, the LoRA
                               update merged in (W + scale * B A); past --shard_size split into
                               model-00001-of-0000N.safetensors + model.safetensors.index.json
    routers.safetensors        the routers and substitutes (float32), under their names in model.py
    config.json                the base's, untouched, plus a "nanoskip" section: route, kv,
                               sinks, substitute, router file, and the compute ratio and quality measured here
    tokenizer.json, ...        the base's tokenizer files, copied
    README.md                  a model card with those numbers

transformers reads config.json and the weights as the dense model with LoRA merged (it knows
nothing of routers); load_weights.load reads them as the sparse model, routers on, through the
same meta-device loader as any base (one copy of the weights in memory).

The numbers on the card are evaluate.py's (gates.evaluate_sparse) on the first --max_chunks
windows of --text, measured before merging, against the base (LoRA off, every gate open). The
folder is written under a temporary name and renamed when complete: an interrupted export
leaves no half folder under the final name.

Every option below is --key=value (python export.py --help lists them).
"""
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import load_weights
import lora
import router
from checkpoint import load_sparse, read_checkpoint_meta, trained_parameters
from configurator import configure, run_main
from gates import evaluate_sparse
from scoring import read_text, windows

DEFAULTS = dict(
    ckpt="out",                            # a train.py out_dir
    out="sparse-model",                    # the folder to write (must not exist, or be empty)
    text="data/heldout/python_docs.txt",   # held-out text the card's numbers are measured on
    seq_len=512,                           # ... in windows of this many tokens (evaluate.py's convention)
    max_chunks=2,                          # ... the first this many
    dtype="auto",                          # auto: each tensor in the dtype the base stores it in;
                                           # or float32 | bfloat16 | float16 for every float tensor
    shard_size="5GB",                      # largest weight file; past it, shards and an index (as the Hub)
)
ROUTER_FILE = "routers.safetensors"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                   "chat_template*", "generation_config.json")   # copied from the base as they are
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 bytes (decimal units, as the Hub's max_shard_size); '300' -> 300."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"--shard_size={text!r}: write a size such as 5GB, 500MB or 300000")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


# ----------------------------------------------------------------------------------------------
# Weights: the base's tensors, LoRA merged, in the base's names and dtype
# ----------------------------------------------------------------------------------------------

def merged_state(model) -> dict:
    """{our base-model name: tensor} of a model whose adapters are merged: a LoRALinear's
    weight under its Linear's own name, routers and adapters left out."""
    trained = set(trained_parameters(model))
    return {name.replace(".base.", "."): t for name, t in model.state_dict().items() if name not in trained}


def weight_entries(model, base: Path, dtype: str) -> list:
    """[(HF name, bytes, fetch)] for every tensor in the base's weight files, in their order.

    fetch() gives the tensor to write: ours (LoRA merged) where the model has it, else the
    base file's own (a buffer we do not use), in the base's dtype or --dtype.
    """
    where = load_weights.open_files(load_weights.weight_files(base))
    ours = merged_state(model)
    by_key = {key: name for name, key in load_weights.hf_keys(ours, model.cfg, where, base).items()}
    entries = []
    for key, (_, handle) in where.items():
        stored = handle.get_slice(key)
        if stored.get_dtype() not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key} in {base} is stored as {stored.get_dtype()}, which export does not copy: "
                             f"it copies {', '.join(SAFETENSORS_DTYPES)}")
        disk = SAFETENSORS_DTYPES[stored.get_dtype()]
        out = disk if dtype == "auto" or not disk.is_floating_point else load_weights.DTYPES[dtype]

        def fetch(key=key, handle=handle, out=out):
            t = ours[by_key[key]] if key in by_key else handle.get_tensor(key)
            return t.to(out).contiguous()
        entries.append((key, torch.Size(stored.get_shape()).numel() * out.itemsize, fetch))
    return entries


def plan_shards(entries, max_bytes: int) -> list:
    """Consecutive groups of entries of at most max_bytes each (a larger tensor gets its own)."""
    groups, size = [[]], 0
    for entry in entries:
        if groups[-1] and size + entry[1] > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry[1]
    return groups


def write_weights(entries, folder: Path, max_bytes: int):
    """model.safetensors, or the Hub's shards and index: one shard in memory at a time."""
    groups = plan_shards(entries, max_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {}
    for name, group in zip(names, groups):
        save_file({key: fetch() for key, _, fetch in group}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key, _, _ in group})
    if len(groups) > 1:
        index = dict(metadata=dict(total_size=sum(e[1] for e in entries)), weight_map=weight_map)
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------------------------
# Config, card, tokenizer
# ----------------------------------------------------------------------------------------------

def measure(model, tok, config) -> dict:
    """evaluate.py's numbers for the sparse model on the first windows of --text (LoRA not yet merged)."""
    chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    res = evaluate_sparse(model, chunks, config["seq_len"])
    keys = ("compute_ratio", "density_attn", "density_mlp", "perplexity", "dense_perplexity", "kl_to_dense",
            "top1_agreement")
    return dict({k: res[k] for k in keys}, text=config["text"], seq_len=config["seq_len"], windows=len(chunks),
                tokens=res["tokens"])


def sparse_section(model, meta, measured) -> dict:
    """What config.json's "nanoskip" section says: how to run the routers, and how they did."""
    return dict(route=model.cfg.route, kv=model.cfg.kv, sinks=model.cfg.sinks, substitute=model.cfg.substitute,
                router_file=ROUTER_FILE,
                compute_ratio=measured["compute_ratio"], measured=measured, base=meta["base"],
                lora_merged=meta["lora"], train_iter=meta.get("train_state", {}).get("iter"))


def card(name: str, section: dict) -> str:
    """README.md of the exported folder."""
    m = section["measured"]
    lora_ = section["lora_merged"]
    return f"""# {name}

A dynamically sparse version of `{section['base']}`, converted with nanoskip: before every
attention and MLP sublayer a router decides, per token, whether to compute it. Routers on
`{section['route']}`, kv mode `{section['kv']}`; rank-{lora_['rank']} LoRA on {', '.join(lora_['targets']) or 'nothing'} merged into the weights.

| measured at export | value |
|---|---|
| compute ratio (FLOPs per token / dense) | {m['compute_ratio']:.3f} |
| density attention / MLP | {m['density_attn']:.3f} / {m['density_mlp']:.3f} |
| perplexity (dense base) | {m['perplexity']:.4f} ({m['dense_perplexity']:.4f}) |
| KL to the dense base | {m['kl_to_dense']:.4f} |
| top-1 agreement with the dense base | {m['top1_agreement']:.3f} |

On `{m['text']}`: the first {m['windows']} windows of {m['seq_len']} tokens ({m['tokens']} scored
tokens), evaluate.py's convention.

## Use

```bash
python sample.py --init={name} --prompt="..."        # sparse: skipped sublayers are not computed
python evaluate.py --init={name} --text=FILE
python bench.py --init={name}
```

`config.json` is the base's plus a `nanoskip` section; transformers loads this folder as the
*dense* model with the LoRA merged (it does not run the routers in `{section['router_file']}`).
"""


def copy_tokenizer(base: Path, folder: Path):
    for pattern in TOKENIZER_FILES:
        for f in base.glob(pattern):
            if f.is_file():
                shutil.copy2(f, folder / f.name)


# ----------------------------------------------------------------------------------------------

def write_folder(model, tok, meta, base: Path, folder: Path, name: str, config):
    """Everything but the rename: measure, merge, write into folder (the card calls it name)."""
    measured = measure(model, tok, config)
    lora.merge(model)
    write_weights(weight_entries(model, base, config["dtype"]), folder, parse_size(config["shard_size"]))
    routers = {n: p.detach().float().contiguous() for n, p in router.named_parameters(model).items()}
    save_file(routers, str(folder / ROUTER_FILE), metadata={"format": "pt"})
    hf = json.loads((base / "config.json").read_text())
    if config["dtype"] != "auto":   # the weights' dtype changed: say so where transformers reads it
        hf.update({k: config["dtype"] for k in ("dtype", "torch_dtype") if k in hf})
    section = sparse_section(model, meta, measured)
    (folder / "config.json").write_text(json.dumps(dict(hf, **{load_weights.SPARSE_SECTION: section}), indent=2))
    copy_tokenizer(base, folder)
    (folder / "README.md").write_text(card(name, section))
    return section


def export(config) -> dict:
    """Write config["out"] from the checkpoint config["ckpt"]; returns the nanoskip section."""
    out = Path(config["out"])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out={out} already exists and is not empty: choose another folder or delete it")
    if config["dtype"] not in ("auto", *load_weights.DTYPES):
        raise ValueError(f"--dtype={config['dtype']}: choose auto or one of {', '.join(load_weights.DTYPES)}")
    parse_size(config["shard_size"])
    meta = read_checkpoint_meta(config["ckpt"])
    base = load_weights.resolve(meta["base"])
    if json.loads((base / "config.json").read_text()).get("model_type") == "gemma3":
        raise ValueError(f"{base} is a multimodal Gemma 3, and export writes text-only models: its "
                         "config.json and vision weights would not fit the exported folder; use the checkpoint itself "
                         "(sample.py / evaluate.py --ckpt=DIR)")
    model, tok, meta = load_sparse(config["ckpt"], "float32")   # merge in float32
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        section = write_folder(model, tok, meta, base, tmp, out.name, config)
        os.replace(tmp, out)             # a directory rename: the folder appears complete, or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return section


def main(argv):
    config = configure(DEFAULTS, argv)
    section = export(config)
    m = section["measured"]
    print(f"wrote {config['out']}: compute ratio {m['compute_ratio']:.3f}, perplexity {m['perplexity']:.4f} "
          f"(dense {m['dense_perplexity']:.4f}) on {m['windows']} windows of {m['text']}")


if __name__ == "__main__":
    run_main(main)

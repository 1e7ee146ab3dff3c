"""research/lm_eval_adapter.py — nanoskip models inside EleutherAI's lm-evaluation-harness.

    pip install -r requirements-dev.txt          # lm-eval and accelerate: optional, for this file only
    python -m research.lm_eval_adapter --model nanoskip --model_args init=smollm2-135m-instruct --tasks hellaswag
    python -m research.lm_eval_adapter --model nanoskip --model_args init=checkpoints/smollm2-135m-instruct-f32,ckpt=out,gates=random,density_text=data/heldout/python_docs.txt --tasks arc_easy,gsm8k --limit 100

`python -m research.lm_eval_adapter` is lm_eval's own command line (every option of `lm_eval --help`) with
one more model registered: `nanoskip`, the class NanoskipLM below. Its --model_args:
  init=NAME_OR_FOLDER   the dense model (a preset name or a Hugging Face-format folder);
  ckpt=OUT_DIR          a train.py checkpoint: evaluate its sparse model (its base replaces init);
  gates=learned|random|open   with ckpt, what decides the skips (as evaluate.py --gates): random keeps
                        per sublayer the share of tokens the learned gates keep on density_text;
  density_text=FILE     gates=random: the text those densities are measured on (its first four
                        512-token windows, cut as evaluate.py cuts them: scoring.windows);
  dtype, device, batch_size (requests per forward), max_gen_toks (default 256), seed (random gates).

The three request types lm_eval sends, and how each is answered (research/tasks.py's functions,
so this file and `python -m research.tasks` score the same way):
  loglikelihood(context, continuation)  tasks.encode_pair splits the tokens as lm_eval's hf model
      does; tasks.continuation_logprobs scores them, batched and right-padded;
  loglikelihood_rolling(text)           the text's tokens in disjoint windows of the model's
      context, each after the one token before it (lm_eval's own window helpers), summed;
  generate_until(context, {until, max_gen_toks, ...})  tasks.generate_until: KV-cached decoding,
      prompts of equal length batched together, stopped at EOS or a stop string.
"""
import sys

import torch

import lm_eval.models  # noqa: F401  lm_eval's own models first: its registry loads them only while empty
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import load_weights
from checkpoint import load_sparse
from gates import forced
from research import tasks
from scoring import gate_stats, read_text, windows


@register_model("nanoskip")
class NanoskipLM(LM):
    """A nanoskip model, dense or sparse, answering lm_eval's requests (see the docstring on top)."""

    def __init__(self, init="smollm2-135m-instruct", ckpt="", gates="learned", density_text="", dtype="float32",
                 device="cpu", batch_size=16, max_gen_toks=256, seed=1337,
                 max_batch_size=None):   # max_batch_size: lm_eval passes it; unused (no "auto" batch size)
        super().__init__()
        if gates not in ("learned", "random", "open"):
            raise ValueError(f"gates must be learned, random or open, got {gates!r}")
        if gates != "learned" and not ckpt:
            raise ValueError(f"gates={gates} needs a sparse model: pass ckpt=OUT_DIR in --model_args")
        if gates == "random" and not density_text:
            raise ValueError("gates=random needs density_text=FILE, the text on which the learned densities are measured")
        device = device or "cpu"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            # lm_eval's command line asks for cuda:0 unless told otherwise; its hf model falls back too
            print(f"nanoskip: device={device} but no CUDA GPU is visible: running on cpu", file=sys.stderr)
            device = "cpu"
        if ckpt:
            self.model, self.tok, _ = load_sparse(ckpt, dtype, device)
        else:
            self.model, self.tok = load_weights.load(init, dtype, device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16   # "auto" is not supported: 16
        self.max_gen_toks = int(max_gen_toks)
        self.gates = {} if gates == "learned" else gates
        if gates == "random":
            try:
                text = read_text(density_text)
            except ValueError as e:
                raise ValueError(f"density_text={density_text} in --model_args: {e}") from None
            chunks = windows(self.tok, text, 512, 4)
            self.gates = gate_stats(self.model, chunks).density()
            torch.manual_seed(int(seed))                       # the coin flips of random gates

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes: BOS, else EOS (as lm_eval's hf model)."""
        return self.tok.bos_id if self.tok.bos_id is not None else min(self.tok.eos_ids)

    def _score(self, pairs, desc) -> list:
        with forced(self.model, self.gates):
            return tasks.continuation_logprobs(self.model, pairs, self.batch_size, desc=desc)

    def loglikelihood(self, requests, disable_tqdm=False) -> list:
        pairs = []
        for context, continuation in (r.args for r in requests):
            if context:
                pairs.append(tasks.encode_pair(self.tok, context, continuation))
                continue
            cont = self.tok.encode(continuation, special=False)   # no context: the prefix token is one,
            prefix = [self.prefix_token_id]                        # unless the continuation starts with it
            pairs.append((prefix, cont) if cont[0] != prefix[0] else (cont[:1], cont[1:]))
        return self._score(pairs, None if disable_tqdm else "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm=False) -> list:
        pairs, owner = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            rolling = get_rolling_token_windows(self.tok.encode(text), self.prefix_token_id,
                                                self.model.cfg.max_seq_len, context_len=1)
            for ctx, cont in map(make_disjoint_window, rolling):
                pairs.append((ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._score(pairs, None if disable_tqdm else "loglikelihood_rolling")):
            totals[n] += ll
        return totals

    def generate_until(self, requests, disable_tqdm=False) -> list:
        """Requests grouped by their generation settings; each group generated in batches."""
        groups = {}
        for n, (context, kwargs) in enumerate(r.args for r in requests):
            groups.setdefault(repr(sorted(kwargs.items())), (kwargs, []))[1].append(n)
        out = [None] * len(requests)
        for kwargs, members in groups.values():
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts = [self.tok.encode(requests[n].args[0]) for n in members]
            with forced(self.model, self.gates):
                texts = tasks.generate_until(
                    self.model, self.tok, prompts, until, int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                    self.batch_size, temperature=temperature, desc=None if disable_tqdm else "generate_until")
            for n, text in zip(members, texts):
                out[n] = text
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "lm_eval"
    cli_evaluate()

#!/usr/bin/env bash
# The GPU rows of RESULTS.md ("On a GPU"), as one run of 10 minutes at most on one GPU.
#
#     bash tools/gpu_bench.sh [OUT_DIR [NAME...]]   # OUT_DIR defaults to results/gpu; needs CUDA
#
# With NAMEs, only those commands run (e.g. llama8b-graph); without, all of them.
#
# Random weights at two presets' shapes (nothing is downloaded; the gates are forced, so the
# speed of either path does not depend on the weights' values), bfloat16, kv="all", densities
# 1, 0.5 and 0.25, each path against the dense path of the same code:
#
#   1. Llama-3.1-8B shape, eager: prefill 1 x 2048, decoding 64 tokens after 512, batch 1
#   1a. its prefill at fixed capacities (capacity.py, --capacity=eager): no reads back to the host
#   1b. the same, each prefill (dense and sparse) replayed as one CUDA graph (--capacity=graph)
#   2. where the time of 1 goes: kernels launched and the GPU's busy time per prefill and per
#      decoding step, dense and at density 0.5 (research/launch_profile.py); and of 1a, with the
#      kernels that took the most time
#   3. Llama-3.1-8B shape, eager decoding at batch 8 alone
#   4. the attention kernels for the kept queries of a compacted prefill (research/attn_kernels.py)
#   5. SmolLM2-135M shape, eager, as 1, and its prefill as 1b
#   6. only when named: 1b with the forward compiled at its capacities (--capacity=compiled-graph)
#
# 1 with --compile=True (compiled.py) is not here: compiling the 8B step takes minutes; its command
# is in RESULTS.md.
#
# The most important rows come first, and every command has its own time limit (595 s in all),
# so a slow command costs its own rows, not the rest. Each writes OUT_DIR/NAME.json (bench.py's JSON
# rows, written to a temporary name and renamed only when the command succeeds) and
# OUT_DIR/NAME.log (its whole output). The targets on the 8B shape: density 0.5
# prefill >= 1.3x the dense path, density 0.5 decoding at batch 1 >= 1.2x.
set -u
OUT=${1:-results/gpu}
ONLY=" ${*:2} "
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures a GPU')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt"

COMMON="--random_weights=True --device=cuda --dtype=bfloat16 --densities=1,0.5,0.25 --kv=all --repeat=3 --json"

run() {     # run NAME SECONDS COMMAND...: COMMAND under a time limit; OUT/NAME.log, OUT/NAME.json
    local name=$1 limit=$2
    shift 2
    [[ "$ONLY" == "  " || "$ONLY" == *" $name "* ]] || return 0
    echo "== $name ($(date +%T), limit ${limit}s)"
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        tail -n 1 "$OUT/$name.log" > "$OUT/$name.json.tmp" && mv "$OUT/$name.json.tmp" "$OUT/$name.json"
        echo "   done"
    else
        echo "   failed or timed out (exit $?): see $OUT/$name.log"
    fi
}

bench() {   # bench NAME SECONDS ARGS...: one bench.py run under a time limit
    local name=$1 limit=$2
    shift 2
    run "$name" "$limit" python bench.py $COMMON "$@"
}

named() {   # named NAME SECONDS ARGS...: bench, but only when NAME is asked for by name
    [[ "$ONLY" == *" $1 "* ]] && bench "$@"
    return 0
}

bench llama8b-eager    110 --init=llama-3.1-8b --prefill=1x2048 --prompt_len=512 --new_tokens=64
bench llama8b-capacity  80 --init=llama-3.1-8b --prefill=1x2048 --prompt_len=64 --new_tokens=8 --capacity=eager
bench llama8b-graph    110 --init=llama-3.1-8b --prefill=1x2048 --prompt_len=64 --new_tokens=8 --capacity=graph
run launch-profile      70 python -m research.launch_profile --preset=llama-3.1-8b --seq_len=2048 --steps=8 \
        --device=cuda --dtype=bfloat16 --json
run launch-profile-capacity 60 python -m research.launch_profile --preset=llama-3.1-8b --seq_len=2048 --steps=2 \
        --device=cuda --dtype=bfloat16 --top=12 --repeat=3 --capacity=True --json
bench llama8b-eager-b8  50 --init=llama-3.1-8b --prefill= --prompt_len=512 --new_tokens=32 --decode_batch=8
run attn-kernels        40 python -m research.attn_kernels --preset=llama-3.1-8b --seq_len=2048 --device=cuda \
        --dtype=bfloat16 --json
bench smollm2-eager     35 --init=smollm2-135m --prefill=1x2048 --prompt_len=512 --new_tokens=64
bench smollm2-graph     40 --init=smollm2-135m --prefill=1x2048 --prompt_len=64 --new_tokens=8 --capacity=graph
# only by name (it compiles the 8B forward twice, dense and at density 0.5: minutes):
named llama8b-compiled-graph 300 --init=llama-3.1-8b --prefill=1x2048 --prompt_len=64 --new_tokens=8 \
        --densities=0.5 --capacity=compiled-graph
echo "rows in $OUT/*.json"

#!/usr/bin/env bash
# The long-answer grid of issue 35 on SmolLM2-135M-Instruct (CPU): recall_lines and trace_lines at
# 1024 tokens, budgets 0.1 and 0.25, both modes, 20 samples per cell, against the full cache.
# Resumable: re-running skips every finished sample (records.jsonl); the page is redrawn at the end.
#
#   bash benchmarks/long_answer_grid.sh                 # the whole grid
#   SAMPLES=3 OUT=/tmp/la bash benchmarks/long_answer_grid.sh   # a short trial in another folder
#
# HeteroCache variants (docs/long-answer.md):
#   heterocache                                     the default: at these budgets pivot_offload="auto"
#                                                   compresses the pivots, so there is no drift refresh;
#                                                   compressed heads are re-chosen at a new turn only
#   heterocache:pivot_offload=false                 the paper's: full pivots, drift-triggered refresh of
#                                                   their satellites while decoding (and turn re-selection)
#   heterocache:pivot_offload=false:refresh=false   the same heads and budgets, turn re-selection only
# The pivot_offload=false variants need a budget above the volatile-and-pivot floor (0.2333 on
# SmolLM2): at 0.1 the harness skips them with the reason (results.json "skipped").
set -euo pipefail
export PYTHONPATH=${PYTHONPATH:-src}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-benchmarks/results/long_answer_smollm2_cpu}
SAMPLES=${SAMPLES:-20}
METHODS=dynamic,heterocache,heterocache:pivot_offload=false,heterocache:pivot_offload=false:refresh=false
METHODS=$METHODS,omnikv,quest,shadowkv,snapkv
python -m heterocache eval --model smollm2 --threads "$OMP_NUM_THREADS" \
    --tasks long_answer --lengths 1024 --budgets 0.1,0.25 --modes query_aware,query_agnostic \
    --methods "$METHODS" --num-samples "$SAMPLES" --out "$OUT" "$@"
python -m heterocache eval-report "$OUT/results.json" --out "$OUT/results.md"

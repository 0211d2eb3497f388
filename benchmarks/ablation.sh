#!/usr/bin/env bash
# The #7 ablation: draft variant x draft-length policy on the same questions, one bench run per
# compiled plan (each run has its own hf-ar and ar baselines, interleaved per question), then
# one table over the runs. Needs the trained exit heads (mirror-sd train exit-head TARGET) and,
# for the self-draft row, `mirror-sd train adapter TARGET --layers 2` (its folder as KANGAROO).
set -euo pipefail
TARGET=${TARGET:-qwen2.5-coder-1.5b}
DRAFT=${DRAFT:-qwen2.5-coder-0.5b}
OUT=${OUT:-benchmarks/results/ablation}
TOKENS=${TOKENS:-32}
COMMON=(--target "$TARGET" --tasks mt_bench,qa,math_reasoning --per-category 1
        --max-new-tokens "$TOKENS" --methods hf-ar,ar,speculative,mirror,speculative+conf,mirror+conf)
run() { local name=$1; shift; mirror-sd bench "${COMMON[@]}" --out "$OUT/$name" "$@" --quiet; }

run int8-lens      --draft "$DRAFT" --set exit_head=lm_head
run int8-trained   --draft "$DRAFT" --set exit_head=trained
run int4-trained   --draft "$DRAFT" --set exit_head=trained --device-map examples/device_maps/ort_ort_cpu_int4.yaml
run int8-vt32k     --draft "$DRAFT" --set exit_head=trained --set draft_vocab_size=32768
if [ -n "${KANGAROO:-}" ]; then run kangaroo-k2 --draft "$KANGAROO" --set exit_head=trained; fi

args=()
for d in "$OUT"/*/; do args+=(--ablation "${d%/}"); done
mirror-sd bench "${args[@]}" --out "$OUT"

#!/usr/bin/env bash
# The #7 ablation: draft variant x draft-length policy on the same questions, one bench run per
# compiled plan (each run has its own hf-ar and ar baselines, interleaved per question), then
# one table over the runs. Needs the trained exit heads (mirror-sd train exit-head TARGET) and,
# for the self-draft row, `mirror-sd train adapter TARGET --layers 2` (its folder as KANGAROO).
#   VARIANTS="int8-lens int8-trained" TOKENS=32 benchmarks/ablation.sh
set -euo pipefail
TARGET=${TARGET:-qwen2.5-coder-1.5b}
DRAFT=${DRAFT:-qwen2.5-coder-0.5b}
OUT=${OUT:-benchmarks/results/ablation}
TOKENS=${TOKENS:-32}
TASKS=${TASKS:-mt_bench,qa,math_reasoning}
METHODS=${METHODS:-hf-ar,ar,speculative,mirror,speculative+conf,mirror+conf}
VARIANTS=${VARIANTS:-int8-lens int8-trained int4-trained int8-vt32k kangaroo-k2}
COMMON=(--target "$TARGET" --tasks "$TASKS" --per-category 1 --max-new-tokens "$TOKENS"
        --methods "$METHODS" --quiet)
INT4=examples/device_maps/ort_ort_cpu_int4.yaml

for v in $VARIANTS; do
  case $v in
    int8-lens)    args=(--draft "$DRAFT" --set exit_head=lm_head) ;;
    int8-trained) args=(--draft "$DRAFT" --set exit_head=trained) ;;
    int4-trained) args=(--draft "$DRAFT" --set exit_head=trained --device-map "$INT4") ;;
    int8-vt32k)   args=(--draft "$DRAFT" --set exit_head=trained --set draft_vocab_size=32768) ;;
    kangaroo-k2)  [ -n "${KANGAROO:-}" ] || { echo "set KANGAROO=<adapter folder>"; exit 2; }
                  args=(--draft "$KANGAROO" --set exit_head=trained) ;;
    *) echo "unknown variant $v"; exit 2 ;;
  esac
  mirror-sd bench "${COMMON[@]}" "${args[@]}" --out "$OUT/$v"
done

tables=()
for v in $VARIANTS; do tables+=(--ablation "$OUT/$v=$v"); done
mirror-sd bench "${tables[@]}" --out "$OUT"

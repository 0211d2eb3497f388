#!/bin/bash
# serve the saved plan with and without the prefix cache; a 4-turn chat and a load run each
# the plan: mirror-sd compile qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b -o /tmp/plans/qwen
set -u
cd "$(dirname "$0")/../../.."
OUT=/tmp/ttft; mkdir -p $OUT
for mode in cache nocache; do
  flag=""; [ $mode = nocache ] && flag="--no-prefix-cache"
  /work/main/.venv/bin/mirror-sd serve /tmp/plans/qwen --port 8011 --served-model-name qwen $flag > $OUT/serve-$mode.log 2>&1 &
  pid=$!
  for i in $(seq 1 300); do grep -q "serving" $OUT/serve-$mode.log && break; sleep 1; done
  /work/main/.venv/bin/python benchmarks/results/serve-prefix-cache/chat_ttft.py http://127.0.0.1:8011/v1 $OUT/chat-$mode.json > $OUT/chat-$mode.txt 2>&1
  /work/main/.venv/bin/python scripts/serve_load.py --base-url http://127.0.0.1:8011/v1 --model qwen --clients 2 --requests 12 --max-tokens 16 --system-file benchmarks/results/serve-prefix-cache/system_prompt.txt > $OUT/load-$mode.txt 2>&1
  curl -s http://127.0.0.1:8011/metrics | grep -E "prefix_cache|prompt_tokens_total|generations_total" > $OUT/metrics-$mode.txt
  kill -INT $pid; wait $pid
done
echo done

"""A four-turn chat against a running `mirror-sd serve`: time to first token per turn and the
answers, written as JSON (the run of docs/benchmarks.md, *Prefix caching in the server*).

    python chat_ttft.py http://127.0.0.1:8011/v1 chat-cache.json
"""

import json
import sys
import time
from pathlib import Path

import openai

TURNS = [
    "Write a function that checks whether a string is a palindrome.",
    "Now make it ignore punctuation and case.",
    "Add a docstring and two doctests.",
    "What is its time complexity?",
]


def main(url: str, out: str) -> None:
    system = (Path(__file__).parent / "system_prompt.txt").read_text()
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": system}]
    records = []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        t0, first, text = time.perf_counter(), None, ""
        for chunk in client.chat.completions.create(
            model="qwen", messages=messages, max_tokens=48, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - t0
                text += chunk.choices[0].delta.content
        total = time.perf_counter() - t0
        records.append({"ttft_s": round(first, 3), "total_s": round(total, 3), "answer": text})
        messages.append({"role": "assistant", "content": text})
    Path(out).write_text(json.dumps(records, indent=1))
    print(json.dumps([(r["ttft_s"], r["total_s"]) for r in records]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

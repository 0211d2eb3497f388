"""Multi-turn chat against a running server: TTFT per turn and the answers (JSON)."""
import json, sys, time
import openai
url, out = sys.argv[1], sys.argv[2]
system = open("/tmp/system_prompt.txt").read()
turns = ["Write a function that checks whether a string is a palindrome.",
         "Now make it ignore punctuation and case.",
         "Add a docstring and two doctests.",
         "What is its time complexity?"]
c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
msgs = [{"role": "system", "content": system}]
rec = []
for t in turns:
    msgs.append({"role": "user", "content": t})
    t0, first, text = time.perf_counter(), None, ""
    for ch in c.chat.completions.create(model="qwen", messages=msgs, max_tokens=48, temperature=0, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            text += ch.choices[0].delta.content
    rec.append({"ttft_s": round(first, 3), "total_s": round(time.perf_counter() - t0, 3), "answer": text})
    msgs.append({"role": "assistant", "content": text})
json.dump(rec, open(out, "w"), indent=1)
print(json.dumps([(r["ttft_s"], r["total_s"]) for r in rec]))

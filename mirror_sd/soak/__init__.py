"""Soak harness (#26, "Evidence at scale"): many generations, and a long server run, while the
draft fails on purpose. Nothing may be lost or changed; memory and threads must stay flat.

    python scripts/soak.py sequential --out soak/sequential [--generations 1000]
    python scripts/soak.py server --out soak/server [--duration 1800] [--clients 8]

Both compile one plan (`--target` / `--draft` default smollm2-135m, `--device-map` and the
speculation flags as `mirror-sd generate` takes them; `--mode` defaults to mirror so that the
draft runs) and wrap its draft runner in `FaultyDraft`, which makes a chosen draft forward raise
(a lost device) or hang past `--draft-timeout`. Prompts rotate over Spec-Bench questions (the
first `--per-category` of each task, chat template applied); every answer is compared with the
target-only greedy output of the same plan for that prompt and length (`mode="autoregressive"`,
computed once per prompt, length and endpoint before the soak starts).

- `sequential`: `--generations` calls of `plan.generate`, each with a random length and mode
  (autoregressive / speculative / mirror, greedy); a share `--fault-rate` of the drafting ones
  gets a fault, raise and hang in turn. RSS and threads are sampled after every generation.
- `server`: the OpenAI-compatible server in-process on a free port; `--clients` threads send
  chat and completion requests of mixed lengths, whole and streamed, close some streams part
  way, and send malformed requests (each must get a 4xx JSON error, never a 5xx). Every
  `--fault-every` seconds the clients pause until the batch has drained, and the next draft
  forward is made to fail: a draft fault drops the draft for the rest of its batch session,
  and under steady load from several clients one session can last the whole run, so without
  the pause only the first fault would hit a running draft. Each fault must show in /metrics
  (`draft_fallbacks_total`, and `draft_disabled` for a hang). RSS and threads are sampled
  every `--sample-every` seconds.

A hung draft is disabled by the plan for good (`plan.draft_disabled`); the harness re-arms it
after each fault (the hung call released, the draft pipeline drained), as an operator
restarting the draft device would, so that every fault hits a live draft.

`--out` gets soak.json (settings, machine, versions, command, counts, every mismatch with the
target's top-2 logit margin where it parts from the reference, faults, samples, flatness),
soak.md (a summary table) and rss_threads.png. The exit code is 0 only when no request was
lost, no output changed and every fault that fired was seen. The server runs without its prefix
cache unless `--prefix-cache`: reused rows may round differently from a fresh prefill, so an
answer can part from the reference at a near-tie (docs/runtime.md, *Prefix caching*; seen on
the int4 smollm2-135m), which the strict comparison counts as a change. docs/soak.md has the
commands of the long runs and how to read the output.

The modules: `cli` (the flags and `main`, which scripts/soak.py calls), `plans` (the plan,
prompts and references), `faults` (`FaultyDraft`, re-arming, the server run's
`FaultInjector` and /metrics), `sequential` and `server` (the two runs), `traffic` (the
server run's clients) and `report` (samples, flatness, soak.json / .md / .png).
"""

"""Soak harness (#26, "Evidence at scale"): many generations, and a long server run, while the
draft fails on purpose. Nothing may be lost or changed; memory and threads must stay flat.

    python scripts/soak.py sequential --out soak/sequential [--generations 1000]
    python scripts/soak.py server --out soak/server [--duration 1800] [--clients 8]
    python scripts/soak.py replay --reference RUN_DIR --out soak/replay [--clients 4]

Each compiles one plan (`--target` / `--draft` default smollm2-135m, `--device-map` and the
speculation flags as `mirror-sd generate` takes them; `--mode` defaults to mirror so that the
draft runs) and wraps its draft runner in `FaultyDraft`, which makes a chosen draft forward
raise (a lost device) or hang past `--draft-timeout` (armed by `sequential` and `server` only). Prompts rotate over Spec-Bench questions (the
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
  forward is made to fail (the pause lets each fault be judged alone). Each fault must show
  in /metrics (`draft_fallbacks_total`, and `draft_disabled` for a hang). RSS and threads are sampled
  every `--sample-every` seconds.

- `replay`: the questions of a `mirror-sd bench --out RUN_DIR` run (its records.jsonl) through
  the server from `--clients` threads sharing one queue, each greedy answer checked against
  the run's `ar` output cut after its first EOS (the bench runs with EOS off, the server stops
  there) and decoded as the server decodes; before serving, the plan's own target-only output
  on the first question must be the reference's (else exit 2: another plan made it). Each
  request is journaled at once (`--resume`); no faults. It writes replay.json and replay.md.

A hung draft stays off (`plan.draft_disabled`) until its call returns; the harness releases
a hung call after each fault (as a device that recovers would) and drains the draft pipeline,
so that every fault hits a live draft.

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
server run's clients), `replay` (the replay run and its report) and `report` (samples,
flatness, soak.json / .md / .png).
"""

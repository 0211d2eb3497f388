"""WHEN it runs: decoding loops, the verification scheduler, acceptance math, tracing."""

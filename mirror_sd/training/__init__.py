"""Training and calibration from the target's own behaviour: an offline corpus, the target's
hidden states and next-token choices over it, and what is fitted to them (trained exit heads,
the Kangaroo self-draft adapter, VocabTrim counts).

Imports `graphs` (and `partition`'s Profile / SpecConfig in `exit_select`): pure torch, no
devices, no runtime — except `vocab_report`, which measures drafts in ONNX Runtime and is
imported only by `calibrate vocab --report`.
"""

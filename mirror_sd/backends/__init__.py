"""HOW each kind of device is used: one `Backend` per family of the device map (onnxruntime,
torch, sim), each owning one spec type.

    facts.py     the capability facts the partitioner asks (light: no device API)
    base.py      the `Backend` protocol: facts plus precision, checks and runner building
    ort.py       onnxruntime       pytorch.py  torch       sim.py  sim (torch on the host)
    registry.py  `BACKENDS` and `backend_for(spec)`

This package's `__init__` imports nothing, so `partition` can import `backends.facts` without
the families' device APIs. Adding a family: docs/architecture.md, Backends.
"""

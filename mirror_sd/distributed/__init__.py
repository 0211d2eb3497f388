"""A tensor-parallel target over torch.distributed (gloo on CPUs, NCCL on CUDA GPUs).

    tp.py       Megatron-style sharding of a CausalLM: column-parallel q/k/v/gate/up,
                row-parallel o/down followed by an all-reduce
    group.py    the device map's `tensor_parallel` checked against the model and the launch
                (world size, divisibility, backend) and the process group started
    runner.py   TPRunner (rank 0: a SplitRunner that broadcasts each call to the other ranks)
                and follow() (ranks > 0: run rank 0's commands on their shard until told to stop)

Launch every rank with `torchrun --nproc-per-node N your_script.py`; see docs/distributed.md.
"""

"""Distributed training: process groups from torchrun, FSDP2 sharding, expert parallelism, memory planning.

The model code (`moecpt.model`) is written for one device; `parallelize.parallelize` is the one place that
decides how it is distributed. Import submodules directly (`from moecpt.parallel.parallelize import ...`).
"""

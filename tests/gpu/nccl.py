"""One NCCL rank with Megatron's parallel state, for the gpu-marked tests (torn down on exit)."""
import contextlib
import os

import torch
import torch.distributed as dist


@contextlib.contextmanager
def single_nccl_rank(port: int):
    from megatron_gift.mcore.parallel import destroy_parallel, initialize_parallel
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        initialize_parallel(seed=1234)
        yield
    finally:
        destroy_parallel()
        dist.destroy_process_group()

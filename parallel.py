"""
Where train.py computes: the device and its precision, and the processes that torchrun starts.

  parallel='ddp'   DistributedDataParallel: every process holds the whole model, its gradients and the
                   AdamW moments, 16 bytes per parameter in float32 (4 + 4 + 8); gradients are all-reduced
                   after the backward pass of a step's last micro-batch. The fastest, while that fits.
  parallel='fsdp'  FSDP2 (torch.distributed.fsdp.fully_shard; ZeRO-3): every process holds 1/world of the
                   weights, gradients and moments. A block's weights are all-gathered just before its
                   forward (and again before its backward) and freed after; gradients are reduce-scattered,
                   so each process updates its own shard. More communication, for a model whose training
                   state does not fit on one device.

How a sharded run's checkpoints are written and read is checkpoint.py.
"""
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT

DTYPES = ("auto", "bfloat16", "float32")  # the values of the scripts' dtype key


def autocast_context(dtype, device_type):
    """torch.autocast for dtype 'bfloat16', 'float32' (autocast off) or 'auto': bfloat16 on CUDA GPUs that
    support it and on CPUs with native bf16 instructions (AVX512-BF16/AMX); float32 elsewhere, where bf16
    is emulated and slower than float32 (10x on an AVX2-only CPU)."""
    if dtype == "auto":
        fast = (torch.cuda.is_bf16_supported() if device_type == "cuda"
                else getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        dtype = "bfloat16" if fast else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype '{dtype}' is not supported: use 'auto', 'bfloat16' or 'float32'")
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def setup(cfg):
    """(distributed, rank, world size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; each process
    then drives one GPU (nccl) or shares the CPU (gloo)."""
    device = cfg["device"]
    if "RANK" not in os.environ:
        return False, 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=cfg["dist_timeout"]))
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def shard_model(config, device, bf16):
    """The GPT for FSDP: built on the meta device (no memory is allocated), each block sharded over the
    processes as its own unit, then the rest (the embedding with the head tied to it, which must stay in one
    unit, and the final norm); only then materialized on device and initialized, as one process would.
    bf16 (on CUDA): the gathered weights and the gradients' computation in bfloat16, their reduction and
    the sharded weights in float32. On a CPU the weights stay float32 (autocast still applies)."""
    with torch.device("meta"):
        model = GPT(config)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    model.init_weights(normal_=draw_whole)
    return model


def draw_whole(weight, mean, std):
    """weight <- N(mean, std) for a weight that may be sharded: the whole tensor is drawn on the CPU, as
    one process draws it, and each process keeps its own part of it."""
    whole = torch.empty(weight.shape).normal_(mean, std).to(weight.device)
    if isinstance(weight, DTensor):
        whole = distribute_tensor(whole, weight.device_mesh, weight.placements, src_data_rank=None)
    weight.copy_(whole)


def set_gradient_sync(model, on):
    """Whether the next backward pass reduces gradients over the processes (DDP or FSDP model, compiled or
    not): a step's micro-batches accumulate locally and only the last one communicates."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = on
    else:
        getattr(model, "_orig_mod", model).set_requires_gradient_sync(on)


def load_full_weights(model, state_dict):
    """A single-file checkpoint's weights into a sharded model: each process keeps its part."""
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def local_part(t):
    """This process's part of a tensor: a DTensor's shard, else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole_value(t):
    """A DTensor's whole value (a collective: every process must call it), else the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def all_finite(tensors):
    """Whether every element is finite on every process (the shards of a DTensor differ per process)."""
    tensors = list(tensors)
    ok = torch.stack([local_part(t).isfinite().all() for t in tensors]).all().float()
    if dist.is_initialized() and any(isinstance(t, DTensor) for t in tensors):
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def state_bytes(model, optimizer):
    """Bytes this process holds of weights, gradients and optimizer state (a tied weight counted once)."""
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(local_part(t).nbytes for t in tensors)

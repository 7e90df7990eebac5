"""
How train.py spreads one run over the processes that torchrun starts, and how its checkpoints are written.

  parallel='ddp'   DistributedDataParallel: every process holds the whole model, its gradients and the
                   AdamW moments, 16 bytes per parameter in float32 (4 + 4 + 8); gradients are all-reduced
                   after the backward pass of a step's last micro-batch. The fastest, while that fits.
  parallel='fsdp'  FSDP2 (torch.distributed.fsdp.fully_shard; ZeRO-3): every process holds 1/world of the
                   weights, gradients and moments. A block's weights are all-gathered just before its
                   forward (and again before its backward) and freed after; gradients are reduce-scattered,
                   so each process updates its own shard. More communication, for a model whose training
                   state does not fit on one device.

A sharded run saves out_dir/shards/iter_NNNNNN/ with torch.distributed.checkpoint (each process writes its own
shards, rank 0 the run's state in state.pt) and commits it by replacing out_dir/shards/latest; any number of
processes can load it. At the end of the run, and on request, it is consolidated into out_dir/ckpt.pt: the
one file that sample.py, evaluate.py and export.py read and that a one-process or DDP run resumes from.

    python parallel.py out/pretrain_1b      # out/pretrain_1b/shards/latest -> out/pretrain_1b/ckpt.pt
"""
import datetime
import os
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPTConfig


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
    model.init_weights()
    return model


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


def local(t):
    """This process's part of a tensor: a DTensor's shard, else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    """A DTensor's whole value (a collective: every process must call it), else the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def all_finite(tensors):
    """Whether every element is finite on every process (the shards of a DTensor differ per process)."""
    tensors = list(tensors)
    ok = torch.stack([local(t).isfinite().all() for t in tensors]).all().float()
    if dist.is_initialized() and any(isinstance(t, DTensor) for t in tensors):
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def state_bytes(model, optimizer):
    """Bytes this process holds of weights, gradients and optimizer state (a tied weight counted once)."""
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(local(t).nbytes for t in tensors)


def save_checkpoint(state, out_dir):
    """Write out_dir/ckpt.pt atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ckpt.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

# ----------------------------------------------------------------------------- sharded checkpoints


def latest_shards(out_dir):
    """The folder of out_dir's newest complete sharded checkpoint, or None."""
    root = os.path.join(out_dir, "shards")
    try:
        with open(os.path.join(root, "latest")) as f:
            return os.path.join(root, f.read().strip())
    except FileNotFoundError:
        return None


def read_state(folder):
    """The run's state (everything but weights and optimizer state) of a sharded checkpoint."""
    path = os.path.join(folder, "state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"sharded checkpoint '{folder}' cannot be read ({path}: {type(e).__name__}: {e})") from e


def save_sharded(state, model, optimizer, out_dir, iter_num):
    """Every process writes its shards of the weights and optimizer state into shards/iter_N/ and rank 0
    the run's state; once all are on disk, rank 0 commits the folder by replacing shards/latest (an atomic
    rename) and deletes the others. A crash mid-save leaves the previous checkpoint in force."""
    root = os.path.join(out_dir, "shards")
    committed = latest_shards(out_dir)
    name = f"iter_{iter_num:06d}"
    if committed and os.path.basename(committed) == name:  # never write into the committed folder
        name += "_again"
    folder = os.path.join(root, name)
    master = dist.get_rank() == 0
    if master:
        shutil.rmtree(folder, ignore_errors=True)  # what a crashed save left
        os.makedirs(folder)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    if master:
        torch.save(state, os.path.join(folder, "state.pt"))
    dist.barrier()
    if master:
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for other in os.listdir(root):
            if other.startswith("iter_") and other != name:
                shutil.rmtree(os.path.join(root, other))


def load_sharded(folder, model, optimizer, no_dist=False):
    """Weights and optimizer state from a sharded checkpoint into a model and optimizer that may be split
    over another number of processes, or not split at all (no_dist: this process alone reads it all)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def consolidate(out_dir):
    """out_dir/ckpt.pt, the single-file checkpoint with optimizer state, from out_dir's newest sharded one;
    in this process alone, which needs the memory of the whole model and its AdamW state (16 bytes per
    parameter). Returns the iteration it holds."""
    folder = latest_shards(out_dir)
    if folder is None:
        raise ValueError(f"'{out_dir}' holds no sharded checkpoint ({os.path.join(out_dir, 'shards', 'latest')} "
                         f"not found)")
    state = read_state(folder)
    cfg = state["config"]
    model = GPT(GPTConfig(**state["model_config"]))
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                           "cpu")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            load_sharded(folder, model, optimizer, no_dist=True)
    except Exception as e:  # a shard missing or truncated
        raise ValueError(f"sharded checkpoint '{folder}' cannot be loaded: {type(e).__name__}: {e}") from e
    save_checkpoint({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, out_dir)
    return state["iter_num"]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python parallel.py OUT_DIR    (writes OUT_DIR/ckpt.pt from OUT_DIR/shards/latest)")
    try:
        it = consolidate(sys.argv[1])
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {os.path.join(sys.argv[1], 'ckpt.pt')} (iter {it})")

"""
A run's checkpoint: out/<run>/ckpt.pt, which train.py (and export.py's import) saves and every script
loads, and the sharded form a run under FSDP writes.

ckpt.pt is a dict of tensors and plain values that loads with torch.load(weights_only=True): 'model'
(the weights), 'model_config' (GPTConfig's fields), 'tokenizer' (its inline spec), and from train.py also
'config', 'optimizer', 'iter_num', 'best_val_loss', 'rng' and the data position, for an exact resume.

A sharded run saves out_dir/shards/iter_NNNNNN/ with torch.distributed.checkpoint (each process writes its
own shards, rank 0 the run's state in state.pt) and commits it by replacing out_dir/shards/latest; any
number of processes can load it. At the end of the run, and on request, it is consolidated into ckpt.pt:

    python checkpoint.py out/pretrain_1b      # out/pretrain_1b/shards/latest -> out/pretrain_1b/ckpt.pt
"""
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import parallel
from model import GPT, GPTConfig
from optim import configure_optimizer
from tokenizer import load_tokenizer


def save(state, out_dir):
    """Write out_dir/ckpt.pt atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ckpt.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load(path, device="cpu"):
    """The checkpoint dict of out_dir/ckpt.pt or of a .pt path; ValueError naming the file otherwise."""
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint '{file}' not found")
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or from an incompatible version
        raise ValueError(f"checkpoint '{file}' cannot be loaded: {type(e).__name__}: {e}") from e


def model_config(ckpt, dropout=0.0):
    """The GPTConfig a checkpoint's model was trained with."""
    return GPTConfig(**{**ckpt["model_config"], "dropout": dropout})


def load_model(path, device="cpu"):
    """(model in eval mode, its tokenizer, the checkpoint dict), for the scripts that sample, evaluate,
    export and build on-policy data. ValueError naming the file for anything it cannot use."""
    ckpt = load(path, device)
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    try:
        model = GPT(model_config(ckpt))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # no weights, or weights of another shape
        raise ValueError(f"checkpoint '{file}' cannot be loaded: {type(e).__name__}: {e}") from e
    if "tokenizer" not in ckpt:
        raise ValueError(f"checkpoint '{file}' holds no tokenizer: it was not written by train.py or export.py")
    return model.to(device).eval(), load_tokenizer(ckpt["tokenizer"]), ckpt

# ----------------------------------------------------------------------------- a training run's checkpoints


def starting_checkpoint(cfg, fsdp):
    """The checkpoint a training run starts from (None from scratch): out_dir/ckpt.pt to resume, or under
    FSDP the state of out_dir's sharded checkpoint (its folder in 'shards'; the weights are read after
    sharding), or init_from's. A new run never silently replaces the checkpoint of another in its out_dir.
    ValueError says why the run cannot start."""
    own, shards = os.path.join(cfg["out_dir"], "ckpt.pt"), latest_shards(cfg["out_dir"])

    def sharded_state():
        return {**read_state(shards), "shards": shards}

    if cfg["init_from"] == "resume":
        if fsdp:
            if shards is None:
                raise ValueError(f"'{cfg['out_dir']}' holds no sharded checkpoint (shards/latest) to resume with "
                                 f"parallel='fsdp'" + (": resume its ckpt.pt with parallel='ddp'"
                                                       if os.path.exists(own) else ""))
            return sharded_state()
        if shards is not None and not os.path.exists(own):
            raise ValueError(f"'{cfg['out_dir']}' holds a sharded checkpoint but no ckpt.pt: resume with "
                             f"--parallel=fsdp under torchrun, or write ckpt.pt with: python checkpoint.py "
                             f"{cfg['out_dir']}")
        ckpt = load(own)
        if "optimizer" not in ckpt:  # e.g. one that export.py imported: a start, not a run to go on with
            raise ValueError(f"{own} holds no training state to resume: start from it with init_from={own}")
        if shards is not None and sharded_state()["iter_num"] > ckpt["iter_num"]:
            raise ValueError(f"'{shards}' is newer than {own}: resume with --parallel=fsdp under torchrun, or "
                             f"bring ckpt.pt up to date with: python checkpoint.py {cfg['out_dir']}")
        if cfg["optimizer"] != ckpt["config"].get("optimizer", "adamw"):
            raise ValueError(f"cannot resume with optimizer={cfg['optimizer']}: {own} was trained with "
                             f"{ckpt['config'].get('optimizer', 'adamw')}")
        return ckpt
    if (os.path.exists(own) or shards) and not cfg["overwrite"]:
        raise ValueError(f"'{own if os.path.exists(own) else shards}' exists: continue that run with "
                         f"--init_from=resume, choose another out_dir, or pass --overwrite=True to replace it")
    return None if cfg["init_from"] == "scratch" else load(cfg["init_from"])


def kept_note(run):
    """Which checkpoint stands when a run stops without saving."""
    return "this run saved no checkpoint" if run.last_saved is None else f"the checkpoint of iter {run.last_saved} is kept"


def save_run(run, val_loss=None):
    """Save the run at run.iter_num, unless it has diverged: non-finite weights or val loss are never
    written. A resumed run that has taken no step already has this checkpoint."""
    if run.iter_num == run.last_saved:
        return
    bad = ("val loss" if val_loss is not None and not math.isfinite(val_loss)
           else "weights" if not parallel.all_finite(run.raw_model.parameters()) else None)
    if bad:
        if run.master:
            print(f"iter {run.iter_num}: not saving a checkpoint: non-finite {bad} ({kept_note(run)})")
        return
    run.last_saved = run.iter_num
    rng = {"torch": torch.get_rng_state(), "sampler": run.sampler.get_state()}  # the same on every rank
    if run.device.startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    state = {"model_config": asdict(run.raw_model.config), "config": run.cfg, "iter_num": run.iter_num,
             "best_val_loss": run.best_val_loss, "loss_ema": run.loss_ema, "rng": rng,
             "data_state": run.batches.state(), "tokenizer": run.tokenizer, "data_meta": run.batches.meta,
             "scanned_files": run.scanned_files, "metrics_bytes": run.log.tell()}
    if run.fsdp:  # every process writes its shards
        save_sharded(state, run.raw_model, run.optimizer, run.cfg["out_dir"], run.iter_num)
    elif run.master:
        save({**state, "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict()},
             run.cfg["out_dir"])


def restore_run(run, ckpt):
    """What save_run saved, back into the run: optimizer state (a sharded run's is read with its shards),
    iteration, best val loss, the running mean of the loss, the data position and the random number
    generators, so the run goes on exactly as if it had not stopped."""
    if not run.fsdp:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    run.iter_num, run.best_val_loss, run.loss_ema = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["loss_ema"]
    run.last_saved = run.iter_num
    run.sampler.set_state(ckpt["rng"]["sampler"])
    run.batches.load_state(ckpt["data_state"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.device.startswith("cuda") and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])


class MetricsLog:
    """metrics.jsonl (and wandb) on the master process."""

    def __init__(self, cfg, master, resume_at=None):
        """resume_at: the file's size when the resumed checkpoint was saved; what a run wrote after it
        (and will write again) is cut, so readers see one curve. A new run starts the file afresh."""
        self.file = self.wandb = None
        if master:
            os.makedirs(cfg["out_dir"], exist_ok=True)
            path = os.path.join(cfg["out_dir"], "metrics.jsonl")
            self.file = open(path, "a" if cfg["init_from"] == "resume" else "w")
            if resume_at is not None and resume_at <= self.file.tell():
                self.file.truncate(resume_at)
                self.file.seek(resume_at)
            if cfg["wandb_log"]:
                import wandb
                self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)

    def __call__(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])

    def tell(self):
        """The file's size so far (on the master process): a resumed run cuts the file back to it."""
        return self.file.tell() if self.file else None

    def close(self):
        if self.file:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()

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
    model = GPT(model_config(state))
    optimizer = configure_optimizer(model, cfg["learning_rate"], cfg["weight_decay"], (cfg["beta1"], cfg["beta2"]))
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            load_sharded(folder, model, optimizer, no_dist=True)
    except Exception as e:  # a shard missing or truncated
        raise ValueError(f"sharded checkpoint '{folder}' cannot be loaded: {type(e).__name__}: {e}") from e
    save({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, out_dir)
    return state["iter_num"]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python checkpoint.py OUT_DIR    (writes OUT_DIR/ckpt.pt from OUT_DIR/shards/latest)")
    try:
        it = consolidate(sys.argv[1])
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {os.path.join(sys.argv[1], 'ckpt.pt')} (iter {it})")

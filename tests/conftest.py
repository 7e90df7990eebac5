import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's scripts are top-level modules, not a package

import json
import subprocess

import numpy as np
import pytest

TEXT = (b"The quick brown fox jumps over the lazy dog. " b"Pack my box with five dozen liquor jugs. "
        b"How vexingly quick daft zebras jump! ") * 200


def write_pretrain_data(path, train=TEXT, val=TEXT[:3000], **meta):
    """A byte-level dataset in the minimal on-disk format train.py reads: uint16 train.bin and val.bin,
    and a meta.json with kind and vocab_size."""
    path.mkdir(parents=True, exist_ok=True)
    np.frombuffer(train, dtype=np.uint8).astype(np.uint16).tofile(path / "train.bin")
    np.frombuffer(val, dtype=np.uint8).astype(np.uint16).tofile(path / "val.bin")
    meta = {"kind": "pretrain", "vocab_size": 256, "tokenizer": {"kind": "bytes"}, "bytes_per_token": 1.0, **meta}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


TINY = ["--dataset=tiny", "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--learning_rate=3e-3", "--eval_iters=2", "--log_interval=1", "--dtype=float32"]


def run_script(script, *args, cwd=None, env=None, torchrun=0):
    """Run a project script in a fresh process; returns the CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, script)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               os.path.join(ROOT, script)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(root, out):
    """{iteration: training loss} of the run in root/out (skipped steps left out)."""
    return {m["iter"]: m["loss"] for m in read_metrics(root / out) if "loss" in m and "skipped" not in m}


@pytest.fixture
def tiny_data(tmp_path):
    write_pretrain_data(tmp_path / "data" / "tiny")
    return tmp_path


def write_sft_split(examples, path, split):
    """An SFT split in the on-disk format train.py reads, from (ids, mask) pairs: uint16 tokens, uint8 loss
    mask, int64 offsets (example i is [idx[i], idx[i+1]))."""
    np.array([t for ids, _ in examples for t in ids], dtype=np.uint16).tofile(path / f"{split}.bin")
    np.array([m for _, mask in examples for m in mask], dtype=np.uint8).tofile(path / f"{split}.mask.bin")
    np.cumsum([0] + [len(ids) for ids, _ in examples], dtype=np.int64).tofile(path / f"{split}.idx")


def write_dpo_split(pairs, path, split):
    """A preference split in the on-disk format train.py reads, from (prompt, chosen, rejected) token lists:
    uint16 tokens and int64 rows of (prompt start, chosen start, rejected start, end)."""
    rows, pos = [], 0
    for p, c, r in pairs:
        rows.append((pos, pos + len(p), pos + len(p) + len(c), pos + len(p) + len(c) + len(r)))
        pos = rows[-1][3]
    np.array([t for pair in pairs for part in pair for t in part], dtype=np.uint16).tofile(path / f"{split}.bin")
    np.array(rows, dtype=np.int64).reshape(-1, 4).tofile(path / f"{split}.idx")

import dataclasses
import os
import subprocess
import sys

import torch

from conftest import ROOT
from model import GPT, GPTConfig


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True)


def write_checkpoint(path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "tokenizer": {"kind": "bytes"}}, path / "ckpt.pt")


def test_sample_greedy_is_deterministic(tmp_path):
    write_checkpoint(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello")
    args = [f"--out_dir={tmp_path}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=20",
            "--temperature=0", "--dtype=float32"]
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("Hello")
    assert "tokens/s" in a.stderr


def test_missing_and_truncated_checkpoint(tmp_path):
    r = run(f"--out_dir={tmp_path}")
    assert r.returncode != 0 and f"checkpoint '{tmp_path}/ckpt.pt' not found" in r.stderr
    write_checkpoint(tmp_path)
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    r = run(f"--out_dir={tmp_path}")
    assert r.returncode != 0 and "cannot be loaded" in r.stderr and "Traceback" not in r.stderr

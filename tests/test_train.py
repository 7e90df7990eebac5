import math
import os

import numpy as np
import pytest
import torch

import train
from conftest import TINY, losses, read_metrics, run_script, write_pretrain_data


def train_run(root, out, *extra, **kw):
    r = run_script("train.py", *TINY, f"--data_root={root}/data", f"--out_dir={root}/{out}", *extra, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_lr_schedule_formula():
    lr, min_lr, warmup, max_iters = 1e-3, 1e-4, 10, 110
    assert train.get_lr(0, lr, min_lr, warmup, max_iters) == pytest.approx(lr / warmup)
    assert train.get_lr(9, lr, min_lr, warmup, max_iters) == pytest.approx(lr)
    assert train.get_lr(10, lr, min_lr, warmup, max_iters) == pytest.approx(lr)
    assert train.get_lr(60, lr, min_lr, warmup, max_iters) == pytest.approx((lr + min_lr) / 2)
    assert train.get_lr(85, lr, min_lr, warmup, max_iters) == pytest.approx(
        min_lr + 0.5 * (1 + math.cos(math.pi * 0.75)) * (lr - min_lr))
    assert train.get_lr(110, lr, min_lr, warmup, max_iters) == pytest.approx(min_lr)
    assert train.get_lr(500, lr, min_lr, warmup, max_iters) == pytest.approx(min_lr)


def test_loss_falls_and_checkpoint_is_complete(tiny_data):
    train_run(tiny_data, "out", "--max_iters=30", "--eval_interval=10")
    metrics = read_metrics(tiny_data / "out")
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["iter"] for m in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5  # uniform is ln 256 = 5.5 nats
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2))
    assert len([m for m in metrics if "loss" in m]) == 30  # one line per log step (log_interval=1)
    ckpt = torch.load(tiny_data / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30 and ckpt["tokenizer"] == {"kind": "bytes"}
    assert set(ckpt) >= {"model", "model_config", "config", "optimizer", "best_val_loss", "rng"}


def test_exact_resume(tiny_data):
    args = ["--max_iters=8", "--eval_interval=4", "--dropout=0.1"]  # dropout: the torch RNG must resume too
    train_run(tiny_data, "straight", *args)
    train_run(tiny_data, "split", *args, "--stop_at_iter=4")
    assert max(losses(tiny_data, "split")) == 4
    train_run(tiny_data, "split", *args, "--init_from=resume")
    assert losses(tiny_data, "split") == losses(tiny_data, "straight")  # bitwise: float == float
    a = torch.load(tiny_data / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tiny_data / "split" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_big_batch(tiny_data):
    train_run(tiny_data, "accum", "--max_iters=3", "--eval_interval=0", "--batch_size=2",
              "--gradient_accumulation_steps=2")
    train_run(tiny_data, "big", "--max_iters=3", "--eval_interval=0", "--batch_size=4")
    la, lb = losses(tiny_data, "accum"), losses(tiny_data, "big")
    assert la.keys() == lb.keys() == {1, 2, 3}
    assert all(abs(la[i] - lb[i]) < 1e-5 for i in la)
    # the gradient's scale, before clipping (Adam and clipping would hide a wrong scale in the weights)
    na, nb = ({m["iter"]: m["grad_norm"] for m in read_metrics(tiny_data / run) if "grad_norm" in m}
              for run in ("accum", "big"))
    assert na.keys() == nb.keys() and all(na[i] == pytest.approx(nb[i], rel=1e-5) for i in na)
    # 2x2 and 4 rows sum in different float32 orders, and Adam divides each gradient component by its own
    # RMS, so tiny components differ by ~3e-6 on some CPUs; a wrong batch moves weights by ~lr = 3e-3
    a = torch.load(tiny_data / "accum" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tiny_data / "big" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_ddp_equals_single_process(tiny_data):
    args = ["--max_iters=3", "--eval_interval=3", "--gradient_accumulation_steps=2"]
    train_run(tiny_data, "single", *args)
    r = train_run(tiny_data, "ddp", *args, torchrun=2)
    assert "2 process(es) x 1 micro-batches" in r.stdout
    la, lb = losses(tiny_data, "single"), losses(tiny_data, "ddp")
    assert la.keys() == lb.keys() == {1, 2, 3}
    assert all(abs(la[i] - lb[i]) <= 1e-5 for i in la)
    va = [m["val_loss"] for m in read_metrics(tiny_data / "single") if "val_loss" in m]
    vb = [m["val_loss"] for m in read_metrics(tiny_data / "ddp") if "val_loss" in m]
    assert va == pytest.approx(vb, abs=1e-5)


def test_wandb_offline(tiny_data):
    train_run(tiny_data, "wb", "--max_iters=3", "--eval_interval=3", "--wandb_log=True",
              env={"WANDB_MODE": "offline", "WANDB_DIR": str(tiny_data), "WANDB_SILENT": "true"})
    runs = [d for d in os.listdir(tiny_data / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    assert any(f.endswith(".wandb") for f in os.listdir(tiny_data / "wandb" / runs[0]))


NEXT_TOKEN_LOSS = train.next_token_loss  # the real one, which the tests below wrap and patch in


def nan_on_calls(bad_calls):
    """next_token_loss, but NaN on the given training calls (eval runs under no_grad and is left alone)."""
    calls = []

    def loss_fn(model, batch):
        loss, stats = NEXT_TOKEN_LOSS(model, batch)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) in bad_calls:
                return loss * float("nan"), stats
        return loss, stats
    return loss_fn


def in_process_config(root, **kw):
    cfg = dict(train.defaults)
    cfg.update(dataset="tiny", data_root=str(root / "data"), out_dir=str(root / "out"), n_layer=1, n_head=2,
               n_kv_head=1, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
               dtype="float32", device="cpu", max_iters=6, eval_interval=3)
    cfg.update(kw)
    return cfg


def test_nan_batch_is_skipped(tiny_data, monkeypatch):
    monkeypatch.setattr(train, "next_token_loss", nan_on_calls({3}))
    train.train(in_process_config(tiny_data))
    metrics = read_metrics(tiny_data / "out")
    assert [m["iter"] for m in metrics if "skipped" in m] == [2]
    assert max(m["iter"] for m in metrics if "loss" in m) == 6  # the run went on
    ckpt = torch.load(tiny_data / "out" / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_repeated_bad_steps_stop_without_checkpoint(tiny_data, monkeypatch, capsys):
    monkeypatch.setattr(train, "next_token_loss", nan_on_calls(set(range(4, 100))))
    with pytest.raises(SystemExit):
        train.train(in_process_config(tiny_data, max_bad_steps=2))
    assert "2 bad steps in a row" in capsys.readouterr().err
    ckpt = torch.load(tiny_data / "out" / "ckpt.pt", weights_only=True)  # written at the iter-3 eval
    assert ckpt["iter_num"] == 3


def test_loss_spike_is_skipped(tiny_data, monkeypatch):
    calls = []

    def spiky(model, batch):
        loss, stats = NEXT_TOKEN_LOSS(model, batch)
        if torch.is_grad_enabled():
            calls.append(1)
            return (loss * 10 if len(calls) == 4 else loss), stats
        return loss, stats
    monkeypatch.setattr(train, "next_token_loss", spiky)
    train.train(in_process_config(tiny_data))
    assert [m["skipped"] for m in read_metrics(tiny_data / "out") if "skipped" in m] == ["spike"]


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--dataset=missing"], "data directory"),
    ("no_meta", [], "meta.json' not found"),
    ("bad_ids", [], "vocab_size 200"),
    ("short_val", [], "val.bin' holds 20 tokens"),
    (None, ["--dtype=float16"], "dtype='float16' must be one of"),
    (None, ["--gradient_accumulation_steps=3"], None),  # fine: one process
])
def test_bad_input(tiny_data, setup, args, message):
    data = tiny_data / "data" / "tiny"
    if setup == "no_meta":
        os.remove(data / "meta.json")
    elif setup == "bad_ids":
        write_pretrain_data(data, vocab_size=200)  # the text is ASCII: plant one id past the vocabulary
        ids = np.fromfile(data / "train.bin", dtype=np.uint16)
        ids[7] = 250
        ids.tofile(data / "train.bin")
    elif setup == "short_val":
        write_pretrain_data(data, val=b"x" * 20)
    r = run_script("train.py", *TINY, f"--data_root={tiny_data}/data", f"--out_dir={tiny_data}/o",
                   "--max_iters=1", "--eval_interval=0", *args)
    if message is None:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(tiny_data / "o" / "ckpt.pt")


def test_resume_with_other_model_refuses_and_keeps_checkpoint(tiny_data):
    train_run(tiny_data, "out", "--max_iters=2", "--eval_interval=0")
    before = (tiny_data / "out" / "ckpt.pt").read_bytes()
    r = run_script("train.py", *TINY, f"--data_root={tiny_data}/data", f"--out_dir={tiny_data}/out",
                   "--init_from=resume", "--max_iters=4", "--n_embd=64")
    assert r.returncode != 0 and "n_embd=64 here but 32 in the checkpoint" in r.stderr
    assert (tiny_data / "out" / "ckpt.pt").read_bytes() == before


def test_out_of_memory_names_the_batch(tiny_data, monkeypatch, capsys):
    def too_big(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(train, "next_token_loss", too_big)
    with pytest.raises(SystemExit):
        train.train(in_process_config(tiny_data, eval_interval=0))
    err = capsys.readouterr().err
    assert "batch_size=4 x block_size=32 does not fit in memory" in err
    assert not os.path.exists(tiny_data / "out" / "ckpt.pt")


def test_every_model_field_is_a_config_key(tiny_data):
    """GPTConfig's fields are train.py's keys with no list to keep in step: set rope_theta, norm_eps and
    tie_embeddings on the command line and find them in the checkpoint's model."""
    import dataclasses
    from model import GPTConfig
    # the vocabulary is the data's and the reward head the mode's (mode='rm')
    assert {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size", "reward_head"} <= set(train.defaults)
    train_run(tiny_data, "knobs", "--max_iters=1", "--eval_interval=0", "--rope_theta=500.0", "--norm_eps=1e-3",
              "--tie_embeddings=False")
    model_config = torch.load(tiny_data / "knobs" / "ckpt.pt", weights_only=True)["model_config"]
    assert (model_config["rope_theta"], model_config["norm_eps"], model_config["tie_embeddings"]) == (500.0, 1e-3, False)

"""parallel='fsdp': FSDP2 over 2 CPU processes (gloo) against DDP and one process, sharded checkpoints,
their resume on another number of processes, and the consolidated ckpt.pt."""
import os
import re
import shutil

import pytest
import torch

import checkpoint
import train
from configurator import configure
from conftest import ROOT, TINY, losses, read_metrics, run_script
from model import GPT, GPTConfig

ARGS = ["--max_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=2"]


def run(root, out, *extra, torchrun=0, ok=True):
    r = run_script("train.py", *TINY, f"--data_root={root}/data", f"--out_dir={root}/{out}", *extra,
                   torchrun=torchrun)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return r


def weights(root, out):
    return torch.load(root / out / "ckpt.pt", weights_only=True)["model"]


def state_mib(r):
    return float(re.search(r"optimizer state: ([\d.]+) MiB in this process", r.stdout).group(1))


def test_initialization_equals_one_process(tiny_data):
    """Built on the meta device, sharded, then initialized: the weights one process draws from the seed."""
    args = ["--max_iters=0", "--eval_interval=0", "--gradient_accumulation_steps=2"]
    run(tiny_data, "one", *args)
    run(tiny_data, "fsdp", *args, "--parallel=fsdp", torchrun=2)
    a, b = weights(tiny_data, "one"), weights(tiny_data, "fsdp")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # init_from=PATH (as SFT starts): a single-file checkpoint's weights, shared out over the shards
    run(tiny_data, "one", *args, "--learning_rate=1e-2", "--overwrite=True", "--seed=7")
    run(tiny_data, "from", *args, "--parallel=fsdp", f"--init_from={tiny_data}/one/ckpt.pt", torchrun=2)
    a, b = weights(tiny_data, "one"), weights(tiny_data, "from")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_equals_ddp_and_one_process(tiny_data):
    run(tiny_data, "one", *ARGS)
    ddp = run(tiny_data, "ddp", *ARGS, torchrun=2)
    fsdp = run(tiny_data, "fsdp", *ARGS, "--parallel=fsdp", torchrun=2)
    assert "2 process(es) x 1 micro-batches" in fsdp.stdout and "FSDP" in fsdp.stdout
    la, lb, lc = (losses(tiny_data, out) for out in ("one", "ddp", "fsdp"))
    assert la.keys() == lb.keys() == lc.keys() == {1, 2, 3, 4}
    # the same global batch summed in other float32 orders (per rank, then reduced): ~1e-7 apart; a
    # wrongly scaled or unsynchronized gradient moves the loss by more than 1e-3 within 4 steps
    assert all(abs(la[i] - lc[i]) <= 1e-5 and abs(lb[i] - lc[i]) <= 1e-5 for i in la)
    # the norm over all shards, which clipping at 1.0 uses (a shard's own norm would be smaller)
    na, nc = ({m["iter"]: m["grad_norm"] for m in read_metrics(tiny_data / out) if "grad_norm" in m}
              for out in ("one", "fsdp"))
    assert all(nc[i] == pytest.approx(na[i], rel=1e-5) and na[i] > 1.0 for i in na)
    # Adam divides each gradient component by its own RMS, so tiny components differ by ~1e-6
    # (test_train's accumulation test); a wrong update moves weights by ~lr = 3e-3
    a, b, c = (weights(tiny_data, out) for out in ("one", "ddp", "fsdp"))
    assert all(torch.allclose(a[k], c[k], atol=2e-5) and torch.allclose(b[k], c[k], atol=2e-5) for k in a)
    # each rank holds half of the weights, gradients and AdamW moments (a block's rows split in two)
    ratio = state_mib(fsdp) / state_mib(ddp)
    assert 0.45 < ratio < 0.6, (state_mib(fsdp), state_mib(ddp))


def test_exact_resume_and_resume_on_other_process_counts(tiny_data):
    args = [*ARGS, "--max_iters=6", "--eval_interval=3", "--dropout=0.1", "--parallel=fsdp"]
    run(tiny_data, "straight", *args, torchrun=2)
    run(tiny_data, "split", *args, "--stop_at_iter=3", torchrun=2)
    assert max(losses(tiny_data, "split")) == 3
    for copy in ("two", "one_fsdp", "one_plain"):
        shutil.copytree(tiny_data / "split", tiny_data / copy)
    run(tiny_data, "split", *args, "--init_from=resume", torchrun=2)
    assert losses(tiny_data, "split") == losses(tiny_data, "straight")  # bitwise
    a, b = weights(tiny_data, "straight"), weights(tiny_data, "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the 2-process shards read by 2 and by 1 FSDP process, and the consolidated ckpt.pt by a plain
    # process: the same next steps up to summation order (without dropout, whose masks are drawn per
    # micro-batch by each process)
    run(tiny_data, "two", *args, "--init_from=resume", "--dropout=0.0", torchrun=2)
    run(tiny_data, "one_fsdp", *args, "--init_from=resume", "--dropout=0.0", torchrun=1)
    run(tiny_data, "one_plain", *args, "--init_from=resume", "--dropout=0.0")
    two = losses(tiny_data, "two")
    for out in ("one_fsdp", "one_plain"):
        lo = losses(tiny_data, out)
        assert lo.keys() == two.keys() == {1, 2, 3, 4, 5, 6}
        assert all(abs(lo[i] - two[i]) <= 1e-5 for i in lo)


def test_consolidated_checkpoint_serves_sample_export_and_equals_shards(tiny_data, tmp_path):
    run(tiny_data, "fsdp", *ARGS, "--parallel=fsdp", torchrun=2)
    out = tiny_data / "fsdp"
    r = run_script("tests/fsdp_forward.py", str(out), str(tmp_path / "logits.pt"), torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    model, _, _ = checkpoint.load_model(str(out))
    tokens = torch.arange(2 * 16).reshape(2, 16) % model.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(model(tokens)[0], torch.load(tmp_path / "logits.pt"), atol=1e-6)
    r = run_script("sample.py", f"--out_dir={out}", "--start=The quick", "--max_new_tokens=8", "--num_samples=1")
    assert r.returncode == 0 and r.stdout.startswith("The quick"), r.stdout + r.stderr
    r = run_script("export.py", f"--ckpt={out}", f"--out={tmp_path}/hf")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # on request: checkpoint.py writes the same file again from the shards
    before = torch.load(out / "ckpt.pt", weights_only=True)
    os.remove(out / "ckpt.pt")
    r = run_script("checkpoint.py", str(out))
    assert r.returncode == 0 and "iter 4" in r.stdout, r.stdout + r.stderr
    after = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]
    assert after["iter_num"] == 4 and after["tokenizer"] == {"kind": "bytes"}


def test_interrupted_save_leaves_the_checkpoint_in_force(tiny_data):
    """A save that died before its commit leaves a folder that 'latest' does not name: resume ignores it
    and the next save removes it."""
    args = [*ARGS, "--parallel=fsdp"]
    run(tiny_data, "run", *args, "--stop_at_iter=2", "--eval_interval=2", torchrun=2)
    shards = tiny_data / "run" / "shards"
    (shards / "iter_000004").mkdir()
    (shards / "iter_000004" / "__0_0.distcp").write_bytes(b"half a shard")
    run(tiny_data, "run", *args, "--init_from=resume", "--eval_interval=2", torchrun=2)
    assert sorted(os.listdir(shards)) == ["iter_000004", "latest"]
    assert (shards / "latest").read_text() == "iter_000004"
    assert max(losses(tiny_data, "run")) == 4


def test_refusals(tiny_data):
    def refused(*extra, torchrun=0):
        r = run(tiny_data, "run", "--max_iters=4", "--gradient_accumulation_steps=2", *extra, torchrun=torchrun,
                ok=False)
        assert torchrun or "Traceback" not in r.stderr  # (torchrun prints its own when a process fails)
        return r.stderr

    assert "optimizer='muon' orthogonalizes whole matrices" in refused("--parallel=fsdp", "--optimizer=muon")
    run(tiny_data, "run", "--max_iters=2", "--eval_interval=2", "--gradient_accumulation_steps=2",
        "--parallel=fsdp", torchrun=2)
    os.remove(tiny_data / "run" / "ckpt.pt")  # a sharded run stopped before its consolidation
    assert "python checkpoint.py" in refused("--init_from=resume")
    assert "shards/iter_000002' exists" in refused()
    shutil.rmtree(tiny_data / "run")
    run(tiny_data, "run", "--max_iters=2", "--eval_interval=2", "--gradient_accumulation_steps=2")
    assert "resume its ckpt.pt with parallel='ddp'" in refused("--init_from=resume", "--parallel=fsdp", torchrun=2)


def test_parallel_cli_names_a_folder_without_shards(tmp_path):
    r = run_script("checkpoint.py", str(tmp_path))
    assert r.returncode != 0 and "holds no sharded checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_1b_config_is_what_its_comments_say():
    path = os.path.join(ROOT, "config", "pretrain_1b.py")
    cfg = configure(train.defaults, [path])
    train.check_config(cfg, 8)
    with torch.device("meta"):  # no memory: only the shapes
        model = GPT(GPTConfig(vocab_size=50304, **{k: cfg[k] for k in train.MODEL_KEYS}))
    n, text = model.num_params(), open(path).read()
    assert cfg["parallel"] == "fsdp" and 0.9e9 < n < 1.2e9
    assert f"N = {n:,} parameters" in text
    assert f"{model.flops_per_token(cfg['block_size']) / 1e9:.2f} GFLOPs" in text
    assert f"weights 4N/8 = {4 * n / 8 / 1e9:.2f}" in text and f"16N = {16 * n / 1e9:.1f} GB" in text
    assert cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"] == 1_048_576

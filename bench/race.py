"""
Time to quality against nanoGPT: the same dims (byte-level stdlib corpus, 4 layers, 4 heads, 256 wide,
block 256, batch 16), the same schedule (warmup 100, cosine to step 600, min_lr 1e-4, beta2 0.99; ours
overrides what --ours gives, by default a 20-step warmup), the same evaluation (every 50 steps, 20
batches per split) and a wall-clock budget each. Reports val loss against wall-clock time (seconds since
the process started, read as each eval line arrives: the same clock for both), each run's final val
loss, when it first reached nanoGPT's final val loss, and the ratio to nanoGPT's time; draws race.png.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT        # not part of this repository
    python bench/make_stdlib_bytes.py data/stdlib_bytes
    python bench/race.py --nanogpt=/tmp/nanoGPT                        # ours: AdamW and Muon

nanoGPT runs from a temporary copy with one line patched: stock nanoGPT never autocasts on a CPU, so
where the CPU computes in bf16 (AVX512-BF16 or AMX; the same rule as dtype='auto' here) its context
becomes bf16 autocast, as ours is. Both use float32 elsewhere.
"""
import argparse
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

SCHEDULE = ["--max_iters=600", "--warmup_iters=100", "--min_lr=1e-4", "--beta2=0.99", "--eval_interval=50",
            "--eval_iters=20", "--log_interval=50"]
DIMS = ["--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=256", "--batch_size=16",
        "--gradient_accumulation_steps=1", "--dropout=0.0"]


def timed_evals(cmd, cwd, pattern, budget):
    """Run cmd; [(seconds since start, step, val loss)] for each eval line; stop it at the budget."""
    t0, points = time.time(), []
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        m = re.search(pattern, line)
        if m:
            points.append((time.time() - t0, int(m.group(1)), float(m.group(2))))
            print(f"  {points[-1][0]:6.1f} s  step {points[-1][1]:4d}  val {points[-1][2]:.4f}", flush=True)
        if time.time() - t0 > budget:
            p.kill()
            break
    if p.wait() not in (0, -9):
        sys.exit(f"{' '.join(cmd[:3])} failed; its output is above")
    return points


def run_nanogpt(checkout, data, lr, bf16, budget, tmp):
    for name in ("train.py", "model.py", "configurator.py"):
        if not os.path.isfile(os.path.join(checkout, name)):
            sys.exit(f"--nanogpt={checkout} has no {name}: give the folder of a nanoGPT checkout")
    work = os.path.join(tmp, "nanogpt")
    os.makedirs(os.path.join(work, "data", "stdlib"))
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(os.path.join(checkout, name), work)
    src = open(os.path.join(work, "train.py")).read()
    stock = "ctx = nullcontext() if device_type == 'cpu' else"
    if stock not in src:
        sys.exit(f"{checkout}/train.py has no line '{stock} ...': not the nanoGPT this was written for")
    if bf16:
        src = src.replace(stock, "ctx =")  # autocast on the CPU too
    open(os.path.join(work, "train.py"), "w").write(src)
    for split in ("train", "val"):
        os.symlink(os.path.abspath(os.path.join(data, f"{split}.bin")),
                   os.path.join(work, "data", "stdlib", f"{split}.bin"))
    with open(os.path.join(work, "data", "stdlib", "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": 256}, f)
    cmd = [sys.executable, "train.py", "--dataset=stdlib", "--device=cpu", "--compile=False", f"--learning_rate={lr}",
           "--lr_decay_iters=600", "--always_save_checkpoint=False", f"--dtype={'bfloat16' if bf16 else 'float32'}",
           f"--out_dir={work}/out", *DIMS, *SCHEDULE]
    return timed_evals(cmd, work, r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", budget)


def run_ours(data_root, extra, budget, tmp, name):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset=stdlib_bytes", f"--data_root={data_root}",
           f"--out_dir={tmp}/{name}", "--n_kv_head=4", "--learning_rate=1e-3", *DIMS, *SCHEDULE, *extra]
    return timed_evals(cmd, tmp, r"^eval (\d+): train_loss [\d.]+, val_loss ([\d.]+)", budget)


def reached(points, target):
    return next((t for t, _, v in points if v <= target), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, help="a nanoGPT checkout")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "stdlib_bytes"))
    ap.add_argument("--seconds", type=float, default=300, help="wall-clock budget of each run")
    ap.add_argument("--nanogpt_lr", default="3e-3",  # the best of 6e-4 ... 6e-3 on a 2-core AVX512-BF16 EPYC
                    help="comma-separated: a sweep, the best one races")
    ap.add_argument("--ours", default="--optimizer=adamw --warmup_iters=20;"
                    "--optimizer=muon --warmup_iters=20 --learning_rate=3e-3 --muon_lr=0.04",
                    help="';'-separated argument sets, each a run of ours")
    ap.add_argument("--png", default="race.png")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.data, "train.bin")):
        sys.exit(f"{args.data}/train.bin not found: python bench/make_stdlib_bytes.py {args.data}")
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    print(f"precision for both: {'bf16 autocast' if bf16 else 'float32'}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.nanogpt_lr.split(","):
            print(f"nanoGPT, learning_rate={lr}")
            runs[f"nanoGPT lr={lr}"] = run_nanogpt(args.nanogpt, args.data, lr, bf16, args.seconds,
                                                   os.path.join(tmp, lr))
        for i, extra in enumerate(x for x in args.ours.split(";") if x.strip()):
            print(f"ours {extra}")
            runs[f"ours {extra}"] = run_ours(os.path.dirname(os.path.abspath(args.data)), extra.split(), args.seconds,
                                             tmp, f"ours{i}")
    best = min((k for k in runs if k.startswith("nanoGPT")), key=lambda k: runs[k][-1][2])
    target, t_ref = runs[best][-1][2], runs[best][-1][0]
    print(f"\ntarget: {best}'s final val loss {target:.4f} at {t_ref:.0f} s (step {runs[best][-1][1]})")
    for name, points in runs.items():
        t = reached(points, target)
        print(f"{name:<34} final val {points[-1][2]:.4f} at step {points[-1][1]} ({points[-1][0]:.0f} s); reaches "
              f"the target " + (f"at {t:.0f} s = {t / t_ref:.2f}x nanoGPT's time" if t else "not within the budget"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name, points in runs.items():
        plt.plot([t for t, _, _ in points], [v for _, _, v in points], "o-", ms=3, label=name)
    plt.axhline(target, ls=":", c="gray")
    plt.gca().set(xlabel="seconds", ylabel="val loss (nats/byte)", ylim=(None, 2.6), title="time to quality")
    plt.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small")  # below: labels are long
    plt.savefig(args.png, dpi=100, bbox_inches="tight")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

"""
Benchmark the real training loop: run train.py on a config in a scratch out_dir, then print the
median step time, tokens/s and MFU (the first logged interval, which holds warm-up, is left out)
and the final validation loss and bits per byte.

    python bench/make_stdlib_bytes.py data/stdlib_bytes      # the reference corpus (bytes, vocab 256)
    python bench/train_bench.py config/bench_cpu.py          # any train.py arguments
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *sys.argv[1:], f"--out_dir={out_dir}"]
        if subprocess.run(cmd).returncode:
            sys.exit("train.py failed")
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    steps = [m for m in metrics if "tokens_per_s" in m][1:]
    evals = [m for m in metrics if "val_loss" in m]
    if not steps:
        sys.exit("no timed steps: raise max_iters or lower log_interval")
    rows = [("iterations", str(evals[-1]["iter"] if evals else steps[-1]["iter"])),
            ("ms/iter (median)", f"{statistics.median(m['ms_per_iter'] for m in steps):.1f}"),
            ("tokens/s (median)", f"{statistics.median(m['tokens_per_s'] for m in steps):,.0f}")]
    if "mfu" in steps[0]:
        rows.append(("MFU (median)", f"{100 * statistics.median(m['mfu'] for m in steps):.1f}%"))
    if evals:
        rows.append(("final val loss (nats/token)", f"{evals[-1]['val_loss']:.4f}"))
        if "val_bpb" in evals[-1]:
            rows.append(("final val bits/byte", f"{evals[-1]['val_bpb']:.4f}"))
    print("\n".join(f"{k:<30}{v}" for k, v in rows))


if __name__ == "__main__":
    main()

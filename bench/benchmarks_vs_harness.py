"""
evaluate.py's benchmarks against lm-evaluation-harness on the same model and the same files, side by
side: per benchmark the items compared, how many disagree (an item whose acc or acc_norm pick differs;
GSM8K: whose generation or strict answer differs), and the wall time and items per second of each, both run as a user
runs them (a process each, float32, on this machine's CPU). The files are generated in each dataset's
published schema (tests/benchmark_files.py), since the real ones are not reachable from here.

    pip install lm-eval==0.4.13 accelerate                     # with torch pinned as in requirements.txt
    python bench/benchmarks_vs_harness.py --n=200              # a random 2-layer model on bytes (block 2048)
    python bench/benchmarks_vs_harness.py --ckpt=out/sft_tiny --n=200 --benchmarks=hellaswag,arc_easy,mmlu
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import numpy as np  # noqa: E402

import benchmarks  # noqa: E402
from benchmark_files import harness_tasks, write  # noqa: E402


def timed(cmd, env=None):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-3000:]}")
    return time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--ckpt", help="a checkpoint to score (default: a random 2-layer model on bytes)")
    ap.add_argument("--n", type=int, default=200, help="items per benchmark file (MMLU: per subject)")
    ap.add_argument("--benchmarks", default="hellaswag,arc_easy,arc_challenge,mmlu,mmlu_5shot,gsm8k")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-harness-")
    try:
        raw, run = os.path.join(tmp, "raw"), os.path.join(tmp, "run")
        write(raw, n=args.n)
        if args.ckpt:
            os.makedirs(run)
            shutil.copy(os.path.join(args.ckpt, "ckpt.pt") if os.path.isdir(args.ckpt) else args.ckpt, run)
        else:
            from test_benchmarks import tiny_model
            tiny_model(run)
        timed([sys.executable, os.path.join(ROOT, "export.py"), f"--ckpt={run}", f"--out={tmp}/hf"])
        tasks = harness_tasks(raw, os.path.join(tmp, "tasks"))
        print(f"{'benchmark':<14}{'items':>7}{'disagree':>10}{'ours s':>9}{'items/s':>9}{'harness s':>11}{'items/s':>9}")
        for name in args.benchmarks.split(","):
            ours_s = timed([sys.executable, os.path.join(ROOT, "evaluate.py"), f"--out_dir={run}", "--data=",
                            "--mc_n=0", "--tasks_n=0", "--samples_n=0", f"--benchmarks={name}",
                            f"--benchmarks_dir={raw}", "--dtype=float32"])
            ours = json.load(open(os.path.join(run, "eval.json")))["benchmarks"]
            out = os.path.join(tmp, f"harness_{name}")
            theirs_s = timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                              f"pretrained={tmp}/hf,dtype=float32", "--tasks", ",".join(tasks[name]),
                              "--include_path", os.path.join(tmp, "tasks"), "--device", "cpu", "--batch_size", "16",
                              "--log_samples", "--output_path", out],
                             env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": os.path.join(tmp, "hf_home")})
            samples = [s for t in tasks[name] for s in sorted(
                (json.loads(line) for f in glob.glob(f"{out}/*/samples_{t}_*.jsonl") for line in open(f)),
                key=lambda s: s["doc_id"]) if s.get("filter", "strict-match") in ("none", "strict-match")]
            mine = ours[name]
            if name == "gsm8k":
                disagree = sum(a != s["resps"][0][0] or b != s["filtered_resps"][0]
                               for a, b, s in zip(mine["generations"], mine["strict"], samples))
            else:
                lls = [np.array([float(c[0][0]) for c in s["resps"]]) for s in samples]
                lengths = [np.array([float(len(c)) for c in it["choices"]]) for it in benchmarks.read(name, raw)]
                disagree = sum(p != int(np.argmax(ll)) or q != int(np.argmax(ll / k))
                               for p, q, ll, k in zip(mine["picked"], mine["picked_norm"], lls, lengths))
            n = mine["n"]
            print(f"{name:<14}{n:>7}{disagree:>10}{ours_s:>9.1f}{n / ours_s:>9.1f}{theirs_s:>11.1f}{n / theirs_s:>9.1f}",
                  flush=True)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

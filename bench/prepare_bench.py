"""
Figures for prepare.py at scale, on a corpus made by bench/make_corpus.py:

    python bench/make_corpus.py --out=/tmp/corpus1 --gb=1 --shards=50
    python bench/prepare_bench.py --corpus=/tmp/corpus1 --workers=1,2 --recall=True

For each worker count it runs `prepare.py` on the corpus's shards as a user would and reports, from
outside the process: wall time, the peak memory of the whole job (prepare.py and all its workers,
their proportional set sizes summed, sampled every second: reading them costs the workers time), the
peak disk used by intermediates (OUT.tmp/); and from meta.json: each stage's time and MB/s. Then it
times the steps a worker runs per document (read, clean, filter, signature, tokenize) on the first
--steps_mb MB of the corpus, one after the other in this process: the core-seconds per GB of each,
what remains to be made faster. With --recall it also runs the document stage and deduplication
through prepare.py's functions and scores the planted near-duplicates: the share caught at each
similarity, next to the banding formula's prediction.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402

import clean  # noqa: E402
import dedup  # noqa: E402
import prepare  # noqa: E402
import sources  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def tree_memory(pid):
    """Memory (bytes) of a process and all its descendants, as the sum of their proportional set sizes
    (PSS: resident pages, a page shared by k processes counted 1/k in each). A plain sum of RSS would
    count the pages that forked workers share copy-on-write with their parent once per process."""
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += 1024 * next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def disk_use(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def run(corpus, workers, out, extra):
    cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), f"--out_dir={out}", f"--num_workers={workers}",
           f"--sources={{'web': '{corpus}/shard_*'}}", *extra]
    peak = {"rss": 0, "disk": 0}
    t0 = time.time()
    with open(out + ".log", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

        def watch():
            n = 0
            while p.poll() is None:
                peak["rss"] = max(peak["rss"], tree_memory(p.pid))
                if n % 5 == 0:
                    peak["disk"] = max(peak["disk"], disk_use(out + ".tmp"))
                n += 1
                time.sleep(1.0)
        w = threading.Thread(target=watch)
        w.start()
        rc = p.wait()
        w.join()
    if rc:
        sys.exit(f"prepare.py failed (exit {rc}); see {out}.log")
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    return time.time() - t0, peak, meta


def report(workers, wall, peak, meta):
    mb, run = meta["input"]["bytes"] / 1e6, meta["run"]
    print(f"\n== {workers} worker(s): {mb:,.0f} MB, {meta['input']['documents']:,} documents, "
          f"{run['units']} units; wall {wall:.0f} s = {mb / wall:.2f} MB/s end to end "
          f"({mb / wall / workers:.2f} MB/s per worker)")
    print(f"   peak memory of the whole job (PSS) {peak['rss'] / 2 ** 20:,.0f} MiB; peak intermediates on disk "
          f"{peak['disk'] / 2 ** 30:.2f} GiB; output {meta['train_tokens'] + meta['val_tokens']:,} tokens")
    print("   stage          seconds    MB/s")
    for stage, s in run["seconds"].items():
        print(f"   {stage:<14}{s:8.1f}" + (f"{run['mb_per_s'][stage]:8.1f}" if s >= 0.05 else "       -"))
    print(f"   dedup: {meta['dedup']}; filters: " + ", ".join(f"{k} {v['removed']}" for k, v in meta['filters'].items()))


def step_costs(corpus, mb, tokenizer_dir):
    """Core-seconds per GB of each step of a worker's loop over a document (prepare.document_stage and
    tokenize_stage), timed one step after the other over the first mb MB of the corpus's documents."""
    cfg = {**prepare.defaults, "sources": {"web": f"{corpus}/shard_*"}}
    texts, seconds, t = [], dict.fromkeys(("read", "clean", "filter", "signature", "tokenize"), 0.0), time.perf_counter()
    for unit in sources.list_units(cfg):
        for _, text, _ in sources.read_unit(unit, cfg, Counter()):
            texts.append(text)
            if sum(map(len, texts)) > mb * 1e6:
                break
        if sum(map(len, texts)) > mb * 1e6:
            break
    seconds["read"] = time.perf_counter() - t
    n_bytes = sum(len(x.encode()) for x in texts)
    params = dedup.minhash_params(cfg["num_perm"], cfg["seed"])
    kept, shingles = [], []
    for text in texts:
        t0 = time.perf_counter()
        text = clean.clean(text, "none")
        t1 = time.perf_counter()
        words = clean.words_of(text)
        grams = clean.ngram_hashes(words, 5)
        passed = clean.filter_reason(text, cfg, words, grams) is None
        t2 = time.perf_counter()
        if passed:
            dedup.exact_key(text)
            shingles.append(dedup.shingle_hashes(words, 5, grams))
            kept.append(text)
        t3 = time.perf_counter()
        seconds["clean"] += t1 - t0
        seconds["filter"] += t2 - t1
        seconds["signature"] += t3 - t2
    t0 = time.perf_counter()
    dedup.band_keys(dedup.minhash_signatures(shingles, params), cfg["bands"])
    seconds["signature"] += time.perf_counter() - t0
    enc = load_tokenizer({"kind": "bpe", "path": "tokenizer.bpe"}, tokenizer_dir)
    t0 = time.perf_counter()
    enc.encode_ordinary_batch(kept, num_threads=1)
    seconds["tokenize"] = time.perf_counter() - t0
    print(f"\n== a worker's steps, one core, on the first {n_bytes / 1e6:.0f} MB ({len(texts):,} documents, "
          f"{len(kept):,} kept): core-seconds per GB, MB per core-second")
    for step, sec in seconds.items():
        print(f"   {step:<14}{sec / n_bytes * 1e9:8.1f}{n_bytes / 1e6 / max(sec, 1e-9):8.2f}")


def recall(corpus, workers, cfg_extra):
    """Planted copies caught, by similarity, against 1 - (1 - s^r)^b (candidates) and the chance that
    the signatures then agree on at least jaccard_threshold of their rows (verification)."""
    cfg = {**prepare.defaults, "sources": {"web": f"{corpus}/shard_*"}, "num_workers": workers, **cfg_extra}
    work = tempfile.mkdtemp(prefix="recall-")
    try:
        units = sources.list_units(cfg)
        tasks = [(i, u, cfg, work) for i, u in enumerate(units)]
        for _ in sources.in_workers(prepare.document_stage, tasks, workers, "documents"):
            pass
        docs = prepare.Documents(work, len(units))
        keep, counts = dedup.deduplicate(docs, cfg)
        where = {}  # (shard file stem, row) -> global id
        for u, unit in enumerate(units):
            stem = os.path.basename(unit["paths"][0]).split(".")[0]
            for g, row in enumerate(docs.npz[u]["pos"].tolist(), start=docs.starts[u]):
                where[stem, row] = g
    finally:
        shutil.rmtree(work)
    rows = [json.loads(line) for line in open(os.path.join(corpus, "planted.jsonl"))]
    b, r, t, p = cfg["bands"], cfg["num_perm"] // cfg["bands"], cfg["jaccard_threshold"], cfg["num_perm"]
    edges = [0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.999, 1.01]
    caught = {e: [0, 0] for e in edges[:-1]}
    seen_copy = set()
    for row in rows:
        copy, orig = (f"shard_{row['shard']:05d}", row["row"]), (f"shard_{row['of_shard']:05d}", row["of_row"])
        if copy not in where or orig not in where:
            continue  # one of the two was filtered out before deduplication
        seen_copy.add(where[copy])
        e = max(x for x in edges[:-1] if x <= row["jaccard"])
        caught[e][0] += not keep[where[copy]]
        caught[e][1] += 1
    print(f"\n== planted near duplicates ({cfg['num_perm']} permutations, {b} bands of {r} rows, threshold {t}; "
          f"dedup removed {counts})")
    print("   similarity     copies  caught   predicted (candidate x verified)")
    for lo, hi in zip(edges[:-1], edges[1:]):
        n_caught, n = caught[lo]
        if not n:
            continue
        s = min(1.0, (lo + min(hi, 1.0)) / 2)
        cand = 1 - (1 - s ** r) ** b
        need = math.ceil(t * p)
        verified = sum(math.comb(p, k) * s ** k * (1 - s) ** (p - k) for k in range(need, p + 1))
        label = "1 (exact)    " if lo > 0.99 else f"[{lo:.2f}, {hi:.2f})"
        print(f"   {label}  {n:7d}  {n_caught / n:6.3f}   {cand * verified:6.3f} "
              f"({cand:.3f} x {verified:.3f})")
    above = [v for lo, v in caught.items() if lo >= t]
    below = [v for lo, v in caught.items() if lo < t]
    tp, pos = sum(v[0] for v in above), sum(v[1] for v in above)
    fp, neg = sum(v[0] for v in below), sum(v[1] for v in below)
    others = np.ones(len(keep), dtype=bool)
    others[list(seen_copy)] = False
    print(f"   recall at J >= {t}: {tp / max(1, pos):.3f} ({tp}/{pos}); removed below it: {fp / max(1, neg):.3f} "
          f"({fp}/{neg}); documents that are no planted copy removed: {int((~keep & others).sum())} of "
          f"{int(others.sum())}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=None, help="where the datasets go (default: a temporary folder)")
    ap.add_argument("--recall", default="False")
    ap.add_argument("--keep", default="False", help="keep the prepared datasets")
    ap.add_argument("--steps_mb", type=float, default=200, help="MB of documents to time the steps on")
    args, extra = ap.parse_known_args()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    base = args.out or tempfile.mkdtemp(prefix="prepare-bench-")
    os.makedirs(base, exist_ok=True)
    outs = []
    for w in map(int, args.workers.split(",")):
        out = os.path.join(base, f"w{w}")
        wall, peak, meta = run(os.path.abspath(args.corpus), w, out, extra)
        report(w, wall, peak, meta)
        outs.append(out)
    if args.steps_mb > 0 and meta["tokenizer"]["kind"] == "bpe":
        step_costs(os.path.abspath(args.corpus), args.steps_mb, outs[-1])
    if args.keep != "True":
        for out in outs:
            shutil.rmtree(out)
    if args.recall == "True":
        recall(os.path.abspath(args.corpus), max(map(int, args.workers.split(","))), {})


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = " ".join(x for x in ("avx512_bf16", "amx_tile") if x in info) or "AVX2 only"
        return f"{name} ({flags})"
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()

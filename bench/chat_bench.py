"""
prepare.py --kind=sft at scale: a generated corpus in SmolTalk's published shape (parquet shards with a
`messages` column of {content, role} turns and a `source` column), conversations of 1 to 4 exchanges cut
from the embedded sources, then prepare.py on it as a user runs it, for each worker count: wall time, MB
of conversation text per second, and per core.

    python bench/chat_bench.py --mb=500 --workers=1,2 --tokenizer_from=data/demo
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_corpus(out, mb, shards, seed=0):
    """Shards of SmolTalk-shaped conversations adding up to about mb MB of message text."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sources import EMBEDDED
    lines = [line for read in EMBEDDED.values() for _, text in read() for line in text.split("\n") if line.strip()]
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    per_shard, total = mb * 1e6 / shards, 0
    for s in range(shards):
        rows, size = [], 0
        while size < per_shard:
            messages = [{"content": "You are a helpful assistant.", "role": "system"}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 4)):
                for role, n in (("user", rng.randint(1, 4)), ("assistant", rng.randint(3, 30))):
                    i = rng.randrange(len(lines) - n)
                    messages.append({"content": "\n".join(lines[i:i + n]), "role": role})
            size += sum(len(m["content"]) for m in messages)
            rows.append({"messages": messages, "source": "generated"})
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, f"train-{s:05d}-of-{shards:05d}.parquet"),
                       row_group_size=1000)
        total += size
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--mb", type=float, default=500)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--tokenizer_from", default="data/demo", help="a prepared dataset or checkpoint")
    ap.add_argument("--block_size", type=int, default=2048)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="chat-bench-")
    try:
        t = time.time()
        chars = write_corpus(os.path.join(tmp, "corpus"), args.mb, args.shards)
        print(f"corpus: {chars / 1e6:.0f} MB of message text in {args.shards} parquet shards ({time.time() - t:.0f} s)")
        for w in map(int, args.workers.split(",")):
            out = os.path.join(tmp, f"w{w}")
            t = time.time()
            r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--kind=sft",
                                f"--tokenizer_from={args.tokenizer_from}", f"--sources={{'chat': '{tmp}/corpus'}}",
                                f"--out_dir={out}", f"--num_workers={w}", f"--block_size={args.block_size}",
                                "--too_long=drop", "--val_fraction=0.01"], capture_output=True, text=True)
            wall = time.time() - t
            if r.returncode:
                sys.exit(f"prepare.py failed:\n{r.stderr[-3000:]}")
            meta = json.load(open(os.path.join(out, "meta.json")))
            n = meta["train_examples"] + meta["val_examples"]
            print(f"{w} worker(s): {wall:.0f} s, {chars / 1e6 / wall:.2f} MB/s, {chars / 1e6 / wall / w:.2f} MB/s per core; "
                  f"{n:,} conversations, {meta['train_tokens'] + meta['val_tokens']:,} tokens, dropped as too long "
                  f"{meta['too_long']['dropped']}")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

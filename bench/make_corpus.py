"""
A large sharded corpus for prepare.py's scale benchmark, generated from the embedded sources (no
network): every document is a handful of passages drawn from random places in the plays, the Bible,
the standard library and the help text, with a few words swapped, so documents are distinct; a known
fraction are planted copies of an earlier document (possibly in another shard), exact or edited to a
known word-shingle Jaccard similarity. Shards alternate between .jsonl and .parquet (pyarrow needed).

    python bench/make_corpus.py --out=/tmp/corpus --gb=5 --shards=60

Writes OUT/shard_NNNNN.{jsonl,parquet} and OUT/planted.jsonl: one row per planted copy with where it
is (shard, row; rows count from 1), where its original is, and their measured Jaccard similarity.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

from clean import words_of  # noqa: E402
from dedup import shingle_hashes  # noqa: E402
from sources import EMBEDDED  # noqa: E402

LEVELS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)  # target similarity of planted copies


def source_lines():
    lines = []
    for read in EMBEDDED.values():
        for _, text in read():
            lines += [line for line in text.split("\n") if len(line.split()) >= 3]
    return lines


def jaccard(a, b):
    sa, sb = (set(shingle_hashes(words_of(t), 5).tolist()) for t in (a, b))
    return len(sa & sb) / max(1, len(sa | sb))


def edit(text, target, rng, vocab):
    """Swap words until the shingle Jaccard with text falls to about target (each swap breaks up to 5
    of the 5-word shingles)."""
    words = text.split(" ")
    n = len(words)
    keep = (2 * target / (1 + target)) ** (1 / 5)  # J = (1-f)^5 / (2 - (1-f)^5) solved for the kept share
    for pos in rng.sample(range(n), min(n, round(n * (1 - keep)))):
        words[pos] = rng.choice(vocab)
    return " ".join(words)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gb", type=float, default=5.0)
    ap.add_argument("--shards", type=int, default=60)
    ap.add_argument("--planted", type=float, default=0.05, help="fraction of documents that are planted copies")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(args.seed)
    lines = source_lines()
    vocab = list({w for line in rng.sample(lines, 20000) for w in line.split()})
    os.makedirs(args.out, exist_ok=True)
    per_shard = args.gb * 1e9 / args.shards
    recent = []  # (shard, row, text) of earlier documents that copies are made from
    with open(os.path.join(args.out, "planted.jsonl"), "w") as planted:
        for s in range(args.shards):
            docs, size = [], 0
            while size < per_shard:
                if recent and rng.random() < args.planted:
                    src_shard, src_row, original = rng.choice(recent)
                    level = rng.choice(LEVELS)
                    text = original if level == 1.0 else edit(original, level, rng, vocab)
                    planted.write(json.dumps({"shard": s, "row": len(docs) + 1, "of_shard": src_shard,
                                              "of_row": src_row, "target": level,
                                              "jaccard": 1.0 if level == 1.0 else jaccard(original, text)}) + "\n")
                else:
                    parts = []
                    for _ in range(rng.randint(4, 10)):
                        i = rng.randrange(len(lines) - 8)
                        parts.append("\n".join(lines[i:i + rng.randint(2, 8)]))
                    words = "\n\n".join(parts).split(" ")
                    for pos in rng.sample(range(len(words)), len(words) // 20):
                        words[pos] = rng.choice(vocab)
                    text = " ".join(words)
                    if rng.random() < 0.02:
                        recent.append((s, len(docs) + 1, text))
                        recent = recent[-5000:]
                docs.append(text)
                size += len(text)
            path = os.path.join(args.out, f"shard_{s:05d}")
            if s % 2 == 0:
                with open(path + ".jsonl", "w") as f:
                    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
            else:
                pq.write_table(pa.table({"text": docs}), path + ".parquet", row_group_size=2000)
            print(f"shard {s + 1}/{args.shards}: {len(docs):,} documents, {size / 1e6:.0f} MB", flush=True)
    n = np.array([json.loads(r)["target"] for r in open(os.path.join(args.out, "planted.jsonl"))])
    print(f"planted {len(n):,} copies; by target similarity: "
          + ", ".join(f"{t}: {(n == t).sum()}" for t in LEVELS))


if __name__ == "__main__":
    main()

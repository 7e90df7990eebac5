"""
Does train.py's memory stay flat while it samples random windows from a multi-GB train.bin? It writes a
token file of --gb GB, then draws random windows two ways and prints the process's resident memory as
it goes, split into anonymous memory (the process's own, which a leak would grow) and file-backed pages
(the memmap's pages of the page cache, which the kernel can drop): from one memmap held for the
whole run, and through train.py's batch source (batches.PretrainBatches.get), which opens a fresh memmap for every batch
(as nanoGPT does) so that the pages one batch touched are unmapped after it.

    python bench/memmap_rss.py --gb=4 --steps=3000
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from batches import PretrainBatches  # noqa: E402


def rss():
    """(anonymous, file-backed) resident MiB of this process."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon", "RssFile")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024
    return fields["RssAnon"], fields["RssFile"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--block_size", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n = int(args.gb * 1e9 / 2)
        rng = np.random.default_rng(0)
        with open(os.path.join(tmp, "train.bin"), "wb") as f:
            for start in range(0, n, 1 << 26):
                rng.integers(0, 256, min(1 << 26, n - start), dtype=np.uint16).tofile(f)
        rng.integers(0, 256, 1 << 20, dtype=np.uint16).tofile(os.path.join(tmp, "val.bin"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"kind": "pretrain", "vocab_size": 256}, f)
        held = np.memmap(os.path.join(tmp, "train.bin"), dtype=np.uint16, mode="r")

        def from_held(g):
            starts = torch.randint(len(held) - args.block_size, (args.batch_size,), generator=g).tolist()
            return np.stack([held[s:s + args.block_size + 1] for s in starts])
        batches = PretrainBatches(tmp, {"block_size": args.block_size, "doc_mask": False}, {})
        for name, draw in (("train.py (a fresh memmap per batch)", lambda g: batches.get("train", args.batch_size, g)),
                           ("one memmap held for the run", from_held)):
            g = torch.Generator().manual_seed(0)
            t0, first = time.time(), rss()
            print(f"\n{name}: {n:,} tokens, {args.batch_size} x {args.block_size} per batch")
            for step in range(args.steps + 1):
                draw(g)
                if step % (args.steps // 6) == 0:
                    anon, file = rss()
                    print(f"step {step:6d}: anonymous {anon:7.1f} MiB ({anon - first[0]:+.1f}), file-backed "
                          f"{file:7.1f} MiB; {(time.time() - t0) / (step + 1) * 1e3:.2f} ms/batch")


if __name__ == "__main__":
    main()

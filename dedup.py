"""
Deduplication for prepare.py, exact and near, over the whole corpus: the per-document keys the workers
compute (exact_key, minhash_signatures, band_keys) and the global pass over them (deduplicate).

Exact: documents whose lowercased, whitespace-collapsed text has the same 128-bit hash; sorting the keys
puts them side by side, and each run of equal keys keeps its first document.

Near (Broder's MinHash with LSH banding): a document is the set of hashes of its word k-grams
(shingles). Under a random hash function h, P[min h(A) = min h(B)] = |A & B| / |A | B|, the Jaccard
similarity, so the fraction of num_perm hash functions on which two signatures (the per-function
minima) agree estimates it. Comparing every pair is quadratic; instead each signature is cut into bands
of rows, and only documents that agree on a whole band become candidates (band_keys), found per band by
sorting the keys, as datatrove's bucket stage does. A candidate whose signature agrees with its bucket's
first document on at least jaccard_threshold of the rows is a duplicate; union-find joins duplicates into
clusters, of which the first document stays.
"""
import hashlib
import zlib

import numpy as np

from clean import ngram_hashes

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
    """(a, b): the num_perm multipliers and offsets of the hash functions, drawn from the seed."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2 ** 64, num_perm, dtype=np.uint64, endpoint=False),
            rng.integers(0, 2 ** 64, num_perm, dtype=np.uint64, endpoint=False))


def minhash_signatures(hash_sets, params, max_cells=1 << 18):
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


def band_keys(sigs, bands):
    """(n, bands) uint64: one hash of each band's rows; equal rows give equal keys. Two documents whose
    signatures agree on every row of some band share that band's key: they become candidates. For
    Jaccard similarity s that happens with probability 1 - (1 - s^r)^bands, r = num_perm / bands rows."""
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


def deduplicate(documents, cfg):
    """Whether each document stays, and how many of each kind were removed. documents: their count
    (len), 'keys' (n, 2) uint64 exact keys, band_keys(band) -> that band's key per document, and
    signatures(ids) -> the MinHash signatures of those ids (prepare.py reads both from disk, one band at
    a time). Exact duplicates first; then near duplicates among the rest. The smallest id of each group
    stays."""
    keep = np.ones(len(documents), dtype=bool)
    counts = {"exact": 0, "near": 0}
    if cfg["dedup_exact"] and len(documents):
        keys = documents.keys
        order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: equal keys keep id order
        k = keys[order]
        same = np.r_[False, (k[1:] == k[:-1]).all(axis=1)]
        keep[order[same]] = False
        counts["exact"] = int(same.sum())
    if cfg["dedup_near"]:
        ids = np.flatnonzero(keep)
        pairs = set()
        for band in range(cfg["bands"]):
            pairs.update(zip(*(x.tolist() for x in bucket_pairs(documents.band_keys(band)[ids], ids))))
        pairs = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
        similar = []
        for c in range(0, len(pairs), 1 << 15):  # bounded memory: 2 x 32k signatures at a time
            chunk = pairs[c:c + (1 << 15)]
            agree = (documents.signatures(chunk[:, 0]) == documents.signatures(chunk[:, 1])).mean(axis=1)
            similar += [p for p, a in zip(chunk.tolist(), agree) if a >= cfg["jaccard_threshold"]]
        drops = cluster_drops(similar)
        keep[drops] = False
        counts["near"] = len(drops)
    return keep, counts

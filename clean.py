"""
Document-level text work for prepare.py: cleaning a document, then the rule filters that decide whether
it is worth training on.

Cleaning (clean): Unicode NFC; mojibake repair (UTF-8 that was decoded as cp1252 or Latin-1, 'cafÃ©' ->
'café', undone run by run and kept only where the bytes are valid UTF-8); markup stripping (html,
markdown, latex; code is left alone); whitespace (Unix line ends, runs of spaces inside lines, trailing
spaces, at most one blank line; indentation kept).

Filters (filter_reason), in the manner of Gopher's quality rules: too short, too few distinct words, too
few letters, too many repeated lines or word 5-grams, too few common words of the language. One pass
over the words (words_of) serves every rule and the near-duplicate shingles of dedup.py.
"""
import html
import re
import unicodedata
import zlib
from collections import Counter

import numpy as np

def normalize_unicode(text):
    return unicodedata.normalize("NFC", text)


def misread_as_cp1252(b):
    """The character a byte becomes when UTF-8 is misread as Windows-1252 (Latin-1 where it has none)."""
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(b)


# each byte 0x80-0xFF as misread by cp1252 and by latin-1 (they differ only on 0x80-0x9F), back to the byte
BYTE_OF_MISREAD = {**{chr(b): b for b in range(0x80, 0x100)},
                   **{misread_as_cp1252(b): b for b in range(0x80, 0x100)}}
MISREAD_LEAD_BYTES = "".join(c for c, b in BYTE_OF_MISREAD.items() if 0xC2 <= b <= 0xF4)
MISREAD_CONTINUATION_BYTES = "".join(c for c, b in BYTE_OF_MISREAD.items() if 0x80 <= b <= 0xBF)
# a UTF-8 lead byte then 1-3 continuation bytes, all misread as characters: 'Ã©' for 'é'
MOJIBAKE = re.compile(f"[{re.escape(MISREAD_LEAD_BYTES)}][{re.escape(MISREAD_CONTINUATION_BYTES)}]{{1,3}}")


def repair_mojibake(text):
    """Undo UTF-8 that was decoded as cp1252/latin-1 ('cafÃ©' -> 'café', 'â€™' -> '’'), run by run: a run
    is re-encoded to bytes and kept re-decoded only if those bytes are valid UTF-8. Repeats for text
    that was mis-decoded twice; keeps the original when nothing improves."""
    if text.isascii():  # nothing misread there (an O(1) test in CPython)
        return text
    for _ in range(3):
        def fix(m):
            try:
                return bytes(BYTE_OF_MISREAD[c] for c in m.group()).decode("utf-8")
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

"""
Tokenizers as tiktoken Encodings, described by a small `spec` dict that travels in meta.json and
checkpoints so any stage can rebuild the exact tokenizer:
  {"kind": "bytes"}  one token per byte, vocab 256, no special tokens
  {"kind": "gpt2"}   GPT-2's BPE (tiktoken's r50k ranks; needs them cached, see README)
"""
import tiktoken

BYTE_PATTERN = r"[\s\S]"  # bytes: any split works, as every byte is its own token


def load_tokenizer(spec):
    """spec dict (or the kind name) -> tiktoken.Encoding"""
    if isinstance(spec, str):
        spec = {"kind": spec}
    kind = spec.get("kind")
    if kind == "bytes":
        return tiktoken.Encoding("bytes", pat_str=BYTE_PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
    if kind == "gpt2":
        return tiktoken.get_encoding("gpt2")
    raise ValueError(f"unknown tokenizer spec {spec!r}: expected kind 'bytes' or 'gpt2'")


def eot_token(enc):
    """Id of <|endoftext|>, or None for a tokenizer without it (bytes)."""
    return enc._special_tokens.get("<|endoftext|>")

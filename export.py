"""
Checkpoints to and from the Hugging Face Llama layout, which Transformers, vLLM and llama.cpp's
converters all read.

    python export.py --ckpt=out/sft_tiny --out=hf/sft_tiny          # ours -> Hugging Face
    python export.py --import=path/to/llama --out=out/llama         # Hugging Face -> out/llama/ckpt.pt

Export writes config.json (LlamaForCausalLM), model.safetensors, generation_config.json, and the
tokenizer as tokenizer.json + tokenizer_config.json (byte-level BPE with the ChatML chat template), so
AutoModelForCausalLM and AutoTokenizer load the directory with no code from here.

Import reads a local directory of that layout (model.safetensors, or the shards that
model.safetensors.index.json lists) and its byte-level BPE tokenizer.json into tiktoken ranks, and
writes a checkpoint that train.py starts from (mode='sft' or 'dpo', init_from=out/llama/ckpt.pt), and
that sample.py, evaluate.py and prepare.py's tokenizer_from read. Chat tokens the tokenizer lacks
(<|im_start|> and the rest of tokenizer.SPECIAL_TOKENS) are added with new embedding rows set to the
mean of the others, as TRL's setup_chat_format does; SFT then teaches them. What this model does not
implement (biases, rope scaling, other architectures, SentencePiece tokenizers) is refused by name.

The weights map one to one: model.py rotates the two halves of each head as Llama does, so q and k need
no permutation; only the fused q/k/v matrix is split on export and joined on import.
"""
import json
import math
import mmap
import os
import shutil
import struct
import sys
from contextlib import contextmanager
from dataclasses import asdict

import torch

import checkpoint
from configurator import configure
from model import GPT, GPTConfig
from tokenizer import SPECIAL_TOKENS

defaults = {
    "ckpt": "",          # export: the run directory (or .pt file) to export
    "import": "",        # import: a Hugging Face Llama-layout directory
    "out": "",           # export: the directory to write; import: the run directory for ckpt.pt
    "dtype": "float32",  # export: the weights' dtype on disk: float32, bfloat16 or float16
    "overwrite": False,  # replace what is already at out
}

# ----------------------------------------------------------------------------- safetensors

# the format: an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
# byte range in the data that follows, then the raw little-endian bytes; no code is ever unpickled
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(tensors, path):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(t.detach().contiguous().view(-1).view(torch.uint8).numpy())


def read_safetensors(path):
    """{name: tensor}, memory-mapped copy-on-write: a tensor's bytes are read when it is first used."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header.pop("__metadata__", None)
        tensors = {}
        for name, h in header.items():
            if h["dtype"] not in DTYPES:
                raise ValueError(f"tensor '{name}' has dtype {h['dtype']}; weights must be one of {sorted(DTYPES)}")
            dtype, (begin, end) = DTYPES[h["dtype"]], h["data_offsets"]
            count = (end - begin) // dtype.itemsize
            if count != math.prod(h["shape"]) or 8 + n + end > len(buf):
                raise ValueError(f"tensor '{name}': byte range {begin}-{end} does not fit shape {h['shape']}")
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count else torch.empty(0)
            tensors[name] = t.view(h["shape"])
        return tensors
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ValueError(f"'{path}' is not a readable safetensors file: {e}") from e


def read_hf_weights(hf_dir):
    """Every tensor of a Hugging Face directory: model.safetensors, or the shards of its index."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        base = os.path.realpath(hf_dir)
        for name in files:  # an index names shards beside it; a name reaching elsewhere is refused
            if not isinstance(name, str) or os.path.dirname(os.path.realpath(os.path.join(base, name))) != base:
                raise ValueError(f"the index names a shard outside '{hf_dir}': {name!r}")
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"'{hf_dir}' has neither model.safetensors nor model.safetensors.index.json "
                         "(pickled pytorch_model.bin files are not read)")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(hf_dir, name)))
    return tensors


# ----------------------------------------------------------------------------- weights and config

# per block: our parameter name -> the Llama name under model.layers.{i}.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")  # our attn.c_attn


def qkv_sizes(c):
    head_dim = c.n_embd // c.n_head
    return [c.n_head * head_dim, c.n_kv_head * head_dim, c.n_kv_head * head_dim]


def to_hf_weights(model):
    """Our state dict under Llama's names (the tied head is stored once, as the embedding). Raises
    ValueError naming every parameter that has no Llama name: a part added to the model is refused
    until it is mapped here, never silently left out of the export."""
    c, sd = model.config, dict(model.state_dict())
    if c.reward_head:
        raise ValueError("it is a reward model (train.py mode='rm'): a scalar head has no LlamaForCausalLM form")
    out = {"model.embed_tokens.weight": sd.pop("wte.weight")}
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for name, t in zip(QKV, sd.pop(ours + "attn.c_attn.weight").split(qkv_sizes(c))):
            out[theirs + name] = t
        out.update({theirs + hf: sd.pop(ours + name) for name, hf in LAYER_NAMES.items()})
    out["model.norm.weight"] = sd.pop("norm.weight")
    head = sd.pop("lm_head.weight")
    if not c.tie_embeddings:
        out["lm_head.weight"] = head
    if sd:
        raise ValueError(f"no Hugging Face Llama name for {', '.join(sorted(sd))}: map it in export.to_hf_weights")
    return out


def from_hf_weights(tensors, c):
    """Llama names -> our state dict for config c; raises ValueError naming missing or unknown tensors."""
    tensors = {k: v for k, v in tensors.items() if "rotary_emb" not in k}  # old files keep inv_freq buffers
    if c.tie_embeddings and "lm_head.weight" in tensors:  # some writers store the tied head twice
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from the embedding")
        del tensors["lm_head.weight"]
    try:
        sd = {"wte.weight": tensors.pop("model.embed_tokens.weight"), "norm.weight": tensors.pop("model.norm.weight")}
        for i in range(c.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            sd[ours + "attn.c_attn.weight"] = torch.cat([tensors.pop(theirs + name) for name in QKV])
            sd.update({ours + name: tensors.pop(theirs + hf) for name, hf in LAYER_NAMES.items()})
        sd["lm_head.weight"] = sd["wte.weight"] if c.tie_embeddings else tensors.pop("lm_head.weight")
    except KeyError as e:
        raise ValueError(f"the weights lack tensor {e}") from None
    if tensors:
        raise ValueError(f"tensors this model has no place for: {sorted(tensors)[:5]}")
    return sd


def special_ids(enc, vocab_size):
    """The tokenizer's special tokens that the model has rows for. A model trained on data whose
    meta.json counted only the 256 bytes has no rows for the tokenizer's specials: they are left out of
    the export rather than named as ids the embedding lacks."""
    return {s: i for s, i in enc._special_tokens.items() if i < vocab_size}


def hf_config(c, special):
    """config.json for LlamaForCausalLM (special: special_ids). rope_theta is written both the
    Transformers 5 way (rope_parameters) and the older way, which other readers (vLLM, llama.cpp) look for."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "head_dim": c.n_embd // c.n_head, "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": None, "eos_token_id": special.get("<|endoftext|>"), "pad_token_id": special.get("<|pad|>"),
    }


def config_from_hf(hf):
    """GPTConfig from a config.json dict; raises ValueError for what model.py does not implement."""
    def refuse(what):
        raise ValueError(f"config.json: {what}, which this project's model does not implement")
    arch = hf.get("architectures") or [hf.get("model_type")]
    if hf.get("model_type") != "llama" or arch != ["LlamaForCausalLM"]:
        refuse(f"architecture {arch} (model_type {hf.get('model_type')!r}), not LlamaForCausalLM")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            refuse(f"{key} is true")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {hf['hidden_act']!r}, not 'silu'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"rope scaling {rope}")
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
        refuse(f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads")
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False))


# ----------------------------------------------------------------------------- tokenizer

def byte_to_unicode():
    """GPT-2's byte-level alphabet: a printable character per byte, so every token is a JSON string.
    Printable Latin-1 bytes stand for themselves; the other bytes take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # ByteLevel's own
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
                 " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")  # tokenizer.render_chat's ChatML


def hf_tokenizer(enc, special):
    """tokenizer.json (the `tokenizers` library's format) for a tiktoken Encoding: the same split
    regex, then byte-level BPE. tiktoken merges whichever adjacent pair forms the lowest-ranked token;
    BPE merges pairs from a list in order, so each token gets one merge per way of splitting it into two
    tokens, ranked by the token's rank. ignore_merges: a whole chunk that is a token stays one, as in
    tiktoken."""
    ranks, to_char = enc._mergeable_ranks, byte_to_unicode()
    text = {b: "".join(to_char[x] for x in b) for b in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        merges += sorted((ranks[a], ranks[b], text[a], text[b]) for a, b in splits if a in ranks and b in ranks)
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in sorted(special.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text[b]: r for b, r in ranks.items()}, "merges": [f"{a} {b}" for _, _, a, b in merges]},
    }


def split_pattern(pre):
    """The one regex a byte-level pre-tokenizer splits by, or ValueError."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    byte_level = steps[-1] if steps[-1].get("type") == "ByteLevel" else None
    if byte_level is None:
        raise ValueError(f"pre_tokenizer {pre} does not end in ByteLevel: not a byte-level BPE")
    if byte_level.get("add_prefix_space"):
        raise ValueError("ByteLevel add_prefix_space=true: tiktoken cannot add a prefix space")
    if len(steps) == 1 and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    if len(steps) == 2 and steps[0].get("type") == "Digits" and byte_level.get("use_regex", True):
        # digits split off first (one by one or in runs), then GPT-2's regex on each piece. As one regex:
        # numbers are digits alone, and a whitespace run before a digit ends a piece, so it stays whole
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return GPT2_PATTERN.replace(r" ?\p{N}+", digits).replace(r"\s+(?!\S)", r"\s+(?![^\s\p{N}])")
    split = steps[0]
    if (len(steps) == 2 and not byte_level.get("use_regex", True) and split.get("type") == "Split"
            and "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert")):
        return split["pattern"]["Regex"]
    raise ValueError(f"pre_tokenizer {pre} is not ByteLevel alone or after one regex Split or Digits")


def tokenizer_from_hf(path):
    """A tokenizer spec {'kind': 'bpe', ...} from a byte-level BPE tokenizer.json: vocabulary ids become
    tiktoken ranks, which requires the merges to create tokens in id order (as GPT-2's, Llama 3's and any
    BPE trained merge by merge do). Raises ValueError saying why a file cannot be read that way."""
    with open(path) as f:
        tok = json.load(f)
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise ValueError(f"model type {model.get('type')!r} is not a byte-level BPE (a SentencePiece-style "
                         "tokenizer has no tiktoken equivalent)")
    if tok.get("normalizer"):
        raise ValueError(f"it applies normalizer {tok['normalizer'].get('type')}, which tiktoken does not")
    pattern = split_pattern(tok.get("pre_tokenizer"))
    special = {}
    for t in tok.get("added_tokens", []):
        if not t.get("special"):
            raise ValueError(f"added token {t['content']!r} is not special: tiktoken has no such kind")
        special[t["content"]] = t["id"]
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    ranks = {}
    for s, i in model["vocab"].items():
        if s not in special:
            if any(c not in to_byte for c in s):
                raise ValueError(f"vocabulary entry {s!r} is not written in the byte-level alphabet")
            ranks[bytes(to_byte[c] for c in s)] = i
    if len(set(ranks.values())) != len(ranks) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("the vocabulary needs every one of the 256 bytes and one id per token")
    last = max(ranks[bytes([b])] for b in range(256))
    for k, merge in enumerate(model.get("merges", [])):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        i = model["vocab"].get(a + b)
        if i is None or i < last:  # equal: another way to build the same token
            raise ValueError(f"merge {k} ({a!r}, {b!r}) builds a token older than the merge before it: "
                             "vocabulary ids are not merge order, so they cannot serve as tiktoken ranks")
        last = i
    table = [None] * (max(ranks.values()) + 1)
    for b, i in ranks.items():
        table[i] = b
    return {"kind": "bpe", "pattern": pattern, "ranks": table, "special_tokens": special,
            "vocab_size": max([len(table), *[i + 1 for i in special.values()]])}


def add_chat_tokens(spec, sd, c):
    """Give the special tokens the chat template and training need ids after the vocabulary, and
    embedding rows set to the mean of the vocabulary's (as are rows added to fit them: the model grows to
    a multiple of 64 where the new ids do not fit); returns the vocabulary size the model needs."""
    missing = [s for s in SPECIAL_TOKENS if s not in spec["special_tokens"]]
    if not missing:
        return c.vocab_size
    first = spec["vocab_size"]
    spec["special_tokens"].update({s: first + i for i, s in enumerate(missing)})
    spec["vocab_size"] += len(missing)
    rows = max(c.vocab_size, 64 * math.ceil(spec["vocab_size"] / 64))  # as train.py sizes a vocabulary
    for name in ("wte.weight",) if c.tie_embeddings else ("wte.weight", "lm_head.weight"):
        w = torch.cat([sd[name], sd[name].new_empty(rows - len(sd[name]), c.n_embd)])
        mean = w[:first].mean(0)  # no token is favoured; rows the model had past the tokenizer stay as they are
        w[first:spec["vocab_size"]] = mean
        w[len(sd[name]):] = mean
        sd[name] = w
    if c.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    return rows


# ----------------------------------------------------------------------------- the two directions

def export(cfg):
    check_target(cfg["out"], cfg["overwrite"])  # before the work, not after it
    try:
        model, enc, ckpt = checkpoint.load_model(cfg["ckpt"])
    except ValueError as e:
        sys.exit(str(e))
    if cfg["dtype"] not in ("float32", "bfloat16", "float16"):
        sys.exit(f"dtype '{cfg['dtype']}' is not one of float32, bfloat16, float16")
    dtype = getattr(torch, cfg["dtype"])
    special = special_ids(enc, model.config.vocab_size)
    stops = [special[s] for s in ("<|endoftext|>", "<|im_end|>") if s in special]
    files = {
        "config.json": {**hf_config(model.config, special), "dtype": cfg["dtype"], "torch_dtype": cfg["dtype"]},
        "generation_config.json": {"bos_token_id": None, "eos_token_id": stops,
                                   "pad_token_id": special.get("<|pad|>")},
        "tokenizer.json": hf_tokenizer(enc, special),
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
                                  "eos_token": "<|endoftext|>" if "<|endoftext|>" in special else None,
                                  "pad_token": "<|pad|>" if "<|pad|>" in special else None,
                                  "chat_template": CHAT_TEMPLATE if "<|im_start|>" in special else None},
    }
    try:
        weights = to_hf_weights(model)
    except ValueError as e:
        sys.exit(f"cannot export {cfg['ckpt']}: {e}")
    with staged_dir(cfg["out"]) as tmp:
        write_safetensors({k: v.to(dtype) for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
        for name, content in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=1 if name != "tokenizer.json" else None)
    print(f"exported {cfg['ckpt']} ({model.num_params() / 1e6:.2f}M parameters, {cfg['dtype']}) to {cfg['out']}")


def is_export(path):
    """Whether path is a directory this script wrote: a config.json naming LlamaForCausalLM."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("architectures") == ["LlamaForCausalLM"]
    except (OSError, ValueError, AttributeError):
        return False


def check_target(path, overwrite):
    """Refuse an out that exists, unless overwrite and it is an export (or an empty directory); finish
    a replacement that a killed run left half done (see staged_dir)."""
    path = path.rstrip("/")
    if not path:
        sys.exit("out is empty: name the directory to write")
    old = path + ".old"
    if os.path.exists(old) and is_export(old):
        if os.path.exists(path):
            shutil.rmtree(old)  # the new one was in place: the old one's deletion was cut off
        else:
            os.rename(old, path)  # cut off between the two renames: put the old one back
    if os.path.exists(path) and not overwrite:
        sys.exit(f"'{path}' exists: pass --overwrite=True to replace it")
    if os.path.exists(path) and not (is_export(path) or os.path.isdir(path) and not os.listdir(path)):
        sys.exit(f"'{path}' holds no config.json of a Llama export, so export.py did not write it: not replacing it")


@contextmanager
def staged_dir(path):
    """Write a directory under a temporary name (path.partial, marked as ours) and move it into place
    only when complete. An existing path (which check_target has let through) is set aside as path.old,
    the new one renamed into place, then the old one deleted, so a complete export stands at path or
    path.old at every instant."""
    path = path.rstrip("/")
    old, tmp = path + ".old", path + ".partial"
    if os.path.exists(tmp):
        if not os.path.isfile(os.path.join(tmp, ".export-partial")):
            sys.exit(f"'{tmp}' exists and was not made by export.py: move it away")
        shutil.rmtree(tmp)  # left by a run that died
    os.makedirs(tmp)
    open(os.path.join(tmp, ".export-partial"), "w").close()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.remove(os.path.join(tmp, ".export-partial"))
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def import_hf(cfg):
    hf_dir = cfg["import"]
    ckpt_path = os.path.join(cfg["out"], "ckpt.pt")
    if os.path.exists(ckpt_path) and not cfg["overwrite"]:
        sys.exit(f"'{ckpt_path}' exists: pass --overwrite=True to replace it")
    where = os.path.join(hf_dir, "config.json")
    try:
        with open(where) as f:
            c = config_from_hf(json.load(f))
        where = os.path.join(hf_dir, "tokenizer.json")
        if not os.path.isfile(where):
            raise ValueError("not found: the import needs the model's byte-level BPE tokenizer")
        spec = tokenizer_from_hf(where)
        where = hf_dir
        sd = {k: v.float() for k, v in from_hf_weights(read_hf_weights(hf_dir), c).items()}
        if spec["vocab_size"] > c.vocab_size:
            raise ValueError(f"the tokenizer has ids beyond the model's vocab_size {c.vocab_size}")
        c.vocab_size = add_chat_tokens(spec, sd, c)
        model = GPT(c)
        model.load_state_dict(sd)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"cannot import '{where}': {type(e).__name__}: {e}")
    checkpoint.save({"model": model.state_dict(), "model_config": asdict(c), "tokenizer": spec,
                     "config": {"mode": "import", "import": hf_dir}}, cfg["out"])
    print(f"imported {hf_dir} ({model.num_params() / 1e6:.2f}M parameters, vocabulary {spec['vocab_size']}) "
          f"to {ckpt_path}")


if __name__ == "__main__":
    cfg = configure(defaults)
    if bool(cfg["ckpt"]) == bool(cfg["import"]) or not cfg["out"]:
        sys.exit("usage: python export.py --ckpt=RUN_DIR --out=HF_DIR  |  python export.py --import=HF_DIR --out=RUN_DIR")
    if cfg["ckpt"]:
        export(cfg)
    else:
        import_hf(cfg)

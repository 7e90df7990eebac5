"""export.py against Hugging Face Transformers itself (a test-only dependency): the same logits from
LlamaForCausalLM, the same token ids from the `tokenizers` library, and bitwise round trips."""
import dataclasses
import json
import os

import pydoc_data.topics
import pytest
import safetensors.torch
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import export
from conftest import run_script
import checkpoint
from model import GPT, GPTConfig
from tokenizer import SPECIAL_TOKENS, bpe_spec, count_chunks, load_tokenizer, render_chat, train_bpe

CORPUS = pydoc_data.topics.topics  # English help text of the standard library, always installed
TEXT = "".join(list(CORPUS.values())[:60])
HELD_OUT = "".join(list(CORPUS.values())[60:90]) + "  x = 12345 ;\n\n\t naïve café 😀 'll 've  \n"


@pytest.fixture(scope="module")
def bpe():
    return bpe_spec(train_bpe(count_chunks([TEXT]), 700), vocab_size=700)


def write_checkpoint(path, spec, seed=0, **kw):
    """A train.py-format checkpoint of a random model; weights far from init so mistakes show."""
    args = {**dict(vocab_size=704, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, hidden_dim=96,
                   rope_theta=5000.0, norm_eps=1e-6), **kw}
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "tokenizer": spec},
               path / "ckpt.pt")
    return model


def export_to(out, ckpt_dir, **cfg):
    export.export({**export.defaults, "ckpt": str(ckpt_dir), "out": str(out), **cfg})


def import_to(out, hf_dir, **cfg):
    export.import_hf({**export.defaults, "import": str(hf_dir), "out": str(out), **cfg})


def logits_diff(ours, theirs, vocab):
    ids = torch.randint(0, vocab, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids)[0][..., :vocab]
        b = theirs(ids).logits[..., :vocab]
    assert a.abs().max() > 0.1  # not a degenerate comparison
    return (a - b).abs().max().item()


@pytest.mark.parametrize("n_kv_head,tie", [(4, True), (2, True), (1, True), (2, False)],
                         ids=["mha", "gqa", "mqa", "gqa-untied"])
def test_export_gives_transformers_the_same_logits(tmp_path, bpe, n_kv_head, tie):
    model = write_checkpoint(tmp_path / "run", bpe, n_kv_head=n_kv_head, tie_embeddings=tie)
    r = run_script("export.py", f"--ckpt={tmp_path}/run", f"--out={tmp_path}/hf")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors",
                                                   "tokenizer.json", "tokenizer_config.json"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, LlamaForCausalLM) and hf.config.num_key_value_heads == n_kv_head
    assert hf.config.tie_word_embeddings == tie and hf.config.rope_parameters["rope_theta"] == 5000.0
    assert logits_diff(model, hf, 704) <= 1e-4


def test_exported_tokenizer_encodes_like_ours(tmp_path, bpe):
    # tiktoken looks a whole chunk up before merging; "abcd" is a token that merges cannot reach from its
    # bytes ("bc" merges first), as some tokens of cl100k's are
    unreachable = bpe_spec({**{bytes([b]): b for b in range(256)}, b"bc": 256, b"ab": 257, b"cd": 258, b"abcd": 259})
    assert load_tokenizer(unreachable).encode_ordinary("abcd abcde") == [259, 32, 97, 256, 100, 101]
    for name, spec in (("bpe", bpe), ("bytes", {"kind": "bytes"}), ("unreachable", unreachable)):
        write_checkpoint(tmp_path / name, spec)
        export_to(tmp_path / f"hf_{name}", tmp_path / name)
        enc, tok = load_tokenizer(spec), AutoTokenizer.from_pretrained(tmp_path / f"hf_{name}")
        text = HELD_OUT + "\nabcd abcde"  # "abcd" alone as a chunk
        ids = enc.encode_ordinary(text)
        assert tok(text)["input_ids"] == ids and tok.decode(ids) == text
        assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}]
        for messages, prompt in ((chat[:3], False), (chat, True)):
            ours = render_chat(enc, messages, generation_prompt=prompt)[0]
            assert tok.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=True)["input_ids"] == ours


def tokenizers_bpe(pre_tokenizer):
    """A byte-level BPE trained by the `tokenizers` library itself, its special token at id 0. It is
    trained with GPT-2's split and numbers in the text, then given pre_tokenizer: its multi-digit tokens
    (as Llama 3's vocabulary has) show whether a digit split is honoured."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    numbers = " ".join(str(n) for n in range(0, 30000, 7))
    tok.train_from_iterator([TEXT, numbers], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("pre", ["byte_level", "digits", "digit_runs", "split"])
def test_imported_tokenizer_encodes_like_tokenizers(tmp_path, pre):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "split")
    first = {"digits": pre_tokenizers.Digits(individual_digits=True), "digit_runs": pre_tokenizers.Digits(),
             "split": pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}{1,2}|\s+|[^\s\p{L}\p{N}]+"), "isolated")}.get(pre)
    tok = tokenizers_bpe(pre_tokenizers.Sequence([first, byte_level]) if first else byte_level)
    tok.save_pretrained(tmp_path)
    enc = load_tokenizer(export.tokenizer_from_hf(tmp_path / "tokenizer.json"))
    text = HELD_OUT + "a  1  b 12 345\n\n  7x  \t9 'll 3's  \n 2024-11-22 ３ x²  "
    assert enc.encode_ordinary(text) == tok(text)["input_ids"]


# sharded: also tied, with spare embedding rows past the tokenizer's 600 ids, where the new chat tokens fit
@pytest.mark.parametrize("shard,vocab,tie", [(None, 600, False), ("60KB", 640, True)], ids=["one-file", "sharded"])
def test_import_transformers_llama(tmp_path, shard, vocab, tie):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
                         tie_word_embeddings=tie, initializer_range=0.2)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    assert os.path.isfile(tmp_path / "hf" / ("model.safetensors.index.json" if shard else "model.safetensors"))
    tok = tokenizers_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
    tok.save_pretrained(tmp_path / "hf")
    r = run_script("export.py", f"--import={tmp_path}/hf", f"--out={tmp_path}/run")
    assert r.returncode == 0, r.stderr
    model, _, ckpt = checkpoint.load_model(str(tmp_path / "run"))
    assert logits_diff(model, hf, 600) <= 1e-4
    enc = load_tokenizer(ckpt["tokenizer"])
    assert enc.encode_ordinary(HELD_OUT) == tok(HELD_OUT)["input_ids"]
    # the chat tokens it lacked follow its vocabulary, their rows (and rows added to fit them) the mean of
    # the vocabulary's; spare rows the model had are kept
    assert [enc.encode_single_token(s) for s in SPECIAL_TOKENS] == [600, 601, 602, 603]
    assert model.config.vocab_size == 640 and enc.encode_single_token("<s>") == 0
    for ours, theirs in ((model.wte.weight, hf.model.embed_tokens.weight), (model.lm_head.weight, hf.lm_head.weight)):
        mean = ours[:600].mean(0).detach()
        assert torch.equal(ours[:600], theirs[:600]) and torch.equal(ours[604:vocab], theirs[604:])
        assert torch.allclose(ours[600:604], mean.expand(4, -1)) and torch.allclose(ours[vocab:], mean)


def test_round_trip_is_bitwise(tmp_path, bpe):
    models = {}
    for name, tie in (("tied", True), ("untied", False)):
        model = models[name] = write_checkpoint(tmp_path / name, bpe, tie_embeddings=tie)
        export_to(tmp_path / f"hf_{name}", tmp_path / name)
        import_to(tmp_path / f"back_{name}", tmp_path / f"hf_{name}")
        back = torch.load(tmp_path / f"back_{name}" / "ckpt.pt", weights_only=True)
        assert back["model_config"] == dataclasses.asdict(model.config) and back["tokenizer"] == bpe
        original = model.state_dict()
        assert back["model"].keys() == original.keys()
        assert all(torch.equal(back["model"][k], original[k]) for k in original)
    # in bfloat16 on disk, the way back gives the weights rounded to bfloat16, exactly
    export_to(tmp_path / "hf_bf16", tmp_path / "tied", dtype="bfloat16")
    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    import_to(tmp_path / "back_bf16", tmp_path / "hf_bf16")
    back = torch.load(tmp_path / "back_bf16" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(back[k], v.bfloat16().float()) for k, v in models["tied"].state_dict().items())


def test_imported_checkpoint_fine_tunes(tmp_path, bpe):
    """The point of importing: prepare SFT data in the model's tokenizer, then train.py mode='sft'."""
    write_checkpoint(tmp_path / "run", bpe, block_size=128)
    export_to(tmp_path / "hf", tmp_path / "run")
    import_to(tmp_path / "imported", tmp_path / "hf")
    r = run_script("prepare.py", "--kind=sft", f"--tokenizer_from={tmp_path}/imported", "--block_size=128",
                   "--sources={'tasks': 'embedded:tasks'}", "--task_examples=40", "--tasks=['add']",
                   f"--out_dir={tmp_path}/data/sft")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", "--mode=sft", "--dataset=sft", f"--data_root={tmp_path}/data",
                   f"--init_from={tmp_path}/imported/ckpt.pt", f"--out_dir={tmp_path}/sft", "--block_size=128",
                   "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "sft" / "ckpt.pt")
    r = run_script("train.py", "--mode=sft", "--dataset=sft", f"--data_root={tmp_path}/data",
                   f"--out_dir={tmp_path}/imported", "--init_from=resume", "--block_size=128")
    assert r.returncode != 0 and "holds no training state to resume" in r.stderr


def test_safetensors_agree_with_the_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2, 2).half()}
    export.write_safetensors(tensors, tmp_path / "ours.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    safetensors.torch.save_file(tensors, tmp_path / "theirs.safetensors")
    ours = export.read_safetensors(tmp_path / "theirs.safetensors")
    for got in (theirs, ours):
        assert got.keys() == tensors.keys()
        assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ours.safetensors").read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut.safetensors"):
        export.read_safetensors(tmp_path / "cut.safetensors")


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("file,changes,message", [
    ("config.json", {"attention_bias": True}, "attention_bias is true"),
    ("config.json", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope scaling"),
    ("config.json", {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "not LlamaForCausalLM"),
    ("config.json", {"hidden_act": "gelu"}, "hidden_act"),
    ("tokenizer.json", {"normalizer": {"type": "NFC"}}, "normalizer NFC"),
    ("tokenizer.json", {"model": {"type": "Unigram", "vocab": []}}, "not a byte-level BPE"),
])
def test_import_refuses_what_the_model_lacks(tmp_path, bpe, file, changes, message):
    write_checkpoint(tmp_path / "run", bpe)
    export_to(tmp_path / "hf", tmp_path / "run")
    edit_json(tmp_path / "hf" / file, **changes)
    with pytest.raises(SystemExit, match=message) as e:
        import_to(tmp_path / "back", tmp_path / "hf")
    assert file in str(e.value) and not (tmp_path / "back" / "ckpt.pt").exists()


def test_export_and_import_protect_what_exists(tmp_path, bpe, monkeypatch):
    write_checkpoint(tmp_path / "run", bpe)
    (tmp_path / "hf").mkdir()
    r = run_script("export.py", f"--ckpt={tmp_path}/run", f"--out={tmp_path}/hf")
    assert r.returncode != 0 and "--overwrite=True" in r.stderr and not os.listdir(tmp_path / "hf")
    export_to(tmp_path / "hf", tmp_path / "run", overwrite=True)
    assert not (tmp_path / "hf.partial").exists()
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()

    def disk_full(tensors, path):
        open(path, "wb").write(b"half")
        raise OSError("No space left on device")
    with monkeypatch.context() as m:  # a failed overwrite keeps the old export and leaves no partial one
        m.setattr(export, "write_safetensors", disk_full)
        with pytest.raises(OSError):
            export_to(tmp_path / "hf", tmp_path / "run", overwrite=True)
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before and not (tmp_path / "hf.partial").exists()
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(SystemExit, match="neither model.safetensors nor"):
        import_to(tmp_path / "back", tmp_path / "hf")
    with pytest.raises(SystemExit, match="exists"):
        import_to(tmp_path / "run", tmp_path / "hf")
    with pytest.raises(SystemExit, match="missing"):
        export_to(tmp_path / "x", tmp_path / "missing")
    assert not (tmp_path / "x").exists()
    r = run_script("export.py", f"--ckpt={tmp_path}/run")
    assert r.returncode != 0 and "usage" in r.stderr


def test_prepare_refuses_a_vocabulary_beyond_uint16(tmp_path):
    """An imported Llama 3 (128,256 ids) trains nothing here: its ids do not fit the uint16 token files."""
    specials = {s: 128_000 + i for i, s in enumerate(SPECIAL_TOKENS)}
    spec = {"kind": "bpe", "pattern": r"[\s\S]", "ranks": [bytes([b]) for b in range(256)], "special_tokens": specials}
    (tmp_path / "big").mkdir()
    torch.save({"tokenizer": spec}, tmp_path / "big" / "ckpt.pt")
    r = run_script("prepare.py", "--kind=sft", f"--tokenizer_from={tmp_path}/big", "--sources={'tasks': 'embedded:tasks'}",
                   "--task_examples=10", f"--out_dir={tmp_path}/data/sft")
    assert r.returncode != 0 and "ids up to 128003" in r.stderr and "big" in r.stderr
    assert not (tmp_path / "data").exists() or not os.listdir(tmp_path / "data")


def test_export_refuses_a_parameter_it_cannot_name(tmp_path, bpe):
    """A part added to the model (here a QK-norm gain, as a forker might add) is refused by name, not
    silently left out of the exported weights."""
    from model import RMSNorm
    model = write_checkpoint(tmp_path / "run", bpe)
    model.blocks[1].attn.q_norm = RMSNorm(16, 1e-6)
    with pytest.raises(ValueError, match=r"no Hugging Face Llama name for blocks\.1\.attn\.q_norm\.weight"):
        export.to_hf_weights(model)


def test_byte_level_model_exports_only_the_ids_it_has(tmp_path):
    """A model trained on data whose meta.json said vocab_size 256 has no rows for the byte tokenizer's
    special tokens (256..259): the export leaves them out instead of naming ids beyond its embedding."""
    model = write_checkpoint(tmp_path / "run", {"kind": "bytes"}, vocab_size=256)
    export_to(tmp_path / "hf", tmp_path / "run")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.eos_token_id is None and hf.config.pad_token_id is None
    assert logits_diff(model, hf, 256) <= 1e-4
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert len(tok) == 256 and tok.encode("hé") == list("hé".encode())


def test_import_refuses_a_shard_outside_its_directory(tmp_path, bpe):
    write_checkpoint(tmp_path / "run", bpe)
    export_to(tmp_path / "hf", tmp_path / "run")
    os.rename(tmp_path / "hf" / "model.safetensors", tmp_path / "elsewhere.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match="names a shard outside"):
        import_to(tmp_path / "back", tmp_path / "hf")

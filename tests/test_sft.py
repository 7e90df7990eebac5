import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chat_data
import train
from conftest import read_metrics, run_script, write_pretrain_data, write_sft_split
from model import GPT, GPTConfig
from tokenizer import load_tokenizer, render_chat

ENC = load_tokenizer("bytes")
IM_END = "<|im_end|>"

RECORDS = {
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 3", "output": "5"}, ["5"]),
    "alpaca_system": ({"system": "Be brief.", "instruction": "Say hi.", "input": "", "output": "Hi."}, ["Hi."]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                    {"from": "gpt", "value": "A one"}, {"from": "human", "value": "Q2"},
                                    {"from": "gpt", "value": "A two!"}]}, ["A one", "A two!"]),
    "sharegpt_roles": ({"conversation": [{"role": "user", "content": "Q"},
                                         {"role": "assistant", "content": "Ans"}]}, ["Ans"]),
    "messages": ({"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
                               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                               {"role": "assistant", "content": "a22"}]}, ["a1", "a22"]),
}


@pytest.mark.parametrize("name", RECORDS)
def test_mask_covers_exactly_the_assistant_turns(name):
    record, replies = RECORDS[name]
    ids, mask = render_chat(ENC, chat_data.to_messages(record))
    assert len(ids) == len(mask)
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    assert [ENC.decode(s) for s in spans] == [r + IM_END for r in replies]
    text = ENC.decode(ids)
    assert text.count("<|im_start|>assistant\n") == len(replies)
    assert text.startswith("<|im_start|>system\n") == ("system" in json.dumps(record))


def test_generation_prompt():
    ids, mask = render_chat(ENC, [{"role": "user", "content": "hi"}], generation_prompt=True)
    assert ENC.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and not any(mask)


def test_alpaca_input_joins_instruction():
    msgs = chat_data.to_messages(RECORDS["alpaca"][0])
    assert msgs == [{"role": "user", "content": "Add the numbers.\n\n2 3"}, {"role": "assistant", "content": "5"}]


def test_every_format_keeps_roles_and_contents():
    """to_messages loses nothing but Alpaca's separate input field (joined to the instruction above)."""
    assert chat_data.to_messages(RECORDS["alpaca_system"][0]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."}]
    turns = RECORDS["sharegpt"][0]["conversations"]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert chat_data.to_messages(RECORDS["sharegpt"][0]) == [{"role": roles[t["from"]], "content": t["value"]}
                                                             for t in turns]


def test_convert_cli(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([r for r, _ in RECORDS.values()]))
    r = run_script("prepare.py", f"--convert={src}", f"--convert_out={tmp_path / 'out.jsonl'}")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line)["messages"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines == [chat_data.to_messages(r) for r, _ in RECORDS.values()]


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "does not end with an assistant"),
    ({"prompt": "x"}, "not an Alpaca"),
])
def test_bad_records(record, message):
    with pytest.raises(ValueError, match=message):
        chat_data.to_messages(record)


def write_bytes_pretrain_dir(path):
    path.mkdir(parents=True)
    np.arange(300, dtype=np.uint16).clip(0, 255).tofile(path / "train.bin")
    (path / "meta.json").write_text(json.dumps({"kind": "pretrain", "vocab_size": 260, "tokenizer": {"kind": "bytes"}}))
    return path


def test_sft_files_errors_and_skips(tmp_path):
    tok = write_bytes_pretrain_dir(tmp_path / "pre")
    good = json.dumps({"instruction": "I", "output": "O"})
    lines = [good] * 30 + [json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "{not json",
                           json.dumps({"instruction": "long " * 200, "output": "O"})]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--kind=sft", f"--tokenizer_from={tok}", f"--sources={{'chat': '{tmp_path}/chat.jsonl'}}",
            "--block_size=128", "--val_fraction=0.2"]
    r = run_script("prepare.py", f"--out_dir={tmp_path}/sft", *args)
    assert r.returncode != 0 and "chat.jsonl:31: unknown role 'robot'" in r.stderr
    assert not (tmp_path / "sft").exists()
    r = run_script("prepare.py", f"--out_dir={tmp_path}/sft", *args, "--on_error=skip")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "sft" / "meta.json").read_text())
    assert sum(meta["skipped"].values()) == 3 and meta["train_examples"] + meta["val_examples"] == 30
    idx = np.fromfile(tmp_path / "sft" / "train.idx", dtype=np.int64)
    mask = np.fromfile(tmp_path / "sft" / "train.mask.bin", dtype=np.uint8)
    assert len(idx) == meta["train_examples"] + 1 and idx[-1] == len(mask) == meta["train_tokens"]


def save_checkpoint(model, path):
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "tokenizer": {"kind": "bytes"}}, path)


def test_loss_is_the_mean_over_all_assistant_tokens_of_the_step(tmp_path):
    """Two examples with 3 and 40 assistant tokens, one per micro-batch: the step's loss is the sum over
    all 43 tokens / 43, not the mean of the two micro-batch means."""
    short = {"messages": [{"role": "user", "content": "q" * 30}, {"role": "assistant", "content": "ab"}]}
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c" * 39}]}
    data = tmp_path / "data" / "two"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    save_checkpoint(model, tmp_path / "init.pt")
    # both splits hold exactly the two examples
    renders = [render_chat(ENC, chat_data.to_messages(rec)) for rec in (short, long)]
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        write_sft_split(renders, data, split)
    (data / "meta.json").write_text(json.dumps({"kind": "sft", "vocab_size": 260, "tokenizer": {"kind": "bytes"},
                                                "special_tokens": {"<|pad|>": 259}}))
    cfg = {**train.defaults, "mode": "sft", "dataset": "two", "data_root": str(tmp_path / "data"),
           "out_dir": str(tmp_path / "out"), "init_from": str(tmp_path / "init.pt"), "block_size": 64,
           "batch_size": 1, "gradient_accumulation_steps": 2, "max_iters": 1, "eval_interval": 0,
           "log_interval": 1, "dtype": "float32", "device": "cpu"}
    train.train(cfg)
    logged = [m["loss"] for m in read_metrics(tmp_path / "out") if "loss" in m][0]
    sums, counts = [], []
    for ids, mask in renders:
        x, y = torch.tensor(ids[:-1])[None], torch.tensor(ids[1:])[None]
        logits, _ = model(x)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        sums.append(F.cross_entropy(logits[0][keep], y[0][keep], reduction="sum").item())
        counts.append(int(keep.sum()))
    assert counts == [3, 40]
    assert logged == pytest.approx(sum(sums) / sum(counts), abs=1e-5)
    assert not math.isclose(logged, (sums[0] / 3 + sums[1] / 40) / 2, abs_tol=1e-3)


def write_task_sft(tmp_path):
    import tasks
    data = tmp_path / "data" / "s"
    data.mkdir(parents=True)
    examples = tasks.make_examples(24, "train", seed=0, tasks=("add", "count_words"))
    renders = [render_chat(ENC, ex["messages"]) for ex in examples]
    for split in ("train", "val"):
        write_sft_split(renders, data, split)
    (data / "meta.json").write_text(json.dumps({"kind": "sft", "vocab_size": 260, "tokenizer": {"kind": "bytes"},
                                                "special_tokens": {"<|pad|>": 259}}))
    write_pretrain_data(tmp_path / "data" / "pre")  # bytes: the same tokenizer, for replay


def test_replay_mixes_pretraining_windows_into_sft_batches(tmp_path):
    write_task_sft(tmp_path)
    cfg = {**train.defaults, "mode": "sft", "data_root": str(tmp_path / "data"), "block_size": 128,
           "replay": 0.25, "replay_dataset": "pre"}
    batches = train.SFTBatches(str(tmp_path / "data" / "s"), cfg, {})
    batch = batches.next_train(8, torch.Generator().manual_seed(0))
    assert batch["idx"].shape == batch["targets"].shape == batch["doc_ids"].shape == (8, 128)
    text = np.fromfile(tmp_path / "data" / "pre" / "train.bin", dtype=np.uint16).tobytes()
    for row in range(6, 8):  # the last 2 of 8 rows: windows of the pretraining text, every token a target
        idx, targets = batch["idx"][row], batch["targets"][row]
        assert (targets[:-1] == idx[1:]).all() and (targets != -100).all() and (batch["doc_ids"][row] == 0).all()
        assert np.array(idx.tolist(), dtype=np.uint16).tobytes() in text
    assert (batch["targets"][:6] == -100).float().mean() > 0.3  # SFT rows: only the answers are targets
    assert batches.state() == {"epoch": 0, "pos": batches.pos} and batches.pos > 0
    refused = run_script("train.py", "--mode=sft", "--replay=0.2", f"--data_root={tmp_path}/data", "--dataset=s")
    assert refused.returncode != 0 and "needs mode='sft' and a replay_dataset" in refused.stderr


@pytest.mark.parametrize("replay", [[], ["--replay=0.25", "--replay_dataset=pre"]])
def test_sft_exact_resume(tmp_path, replay):
    """The epoch cursor of the packed examples is saved, so SFT resumes bit for bit too (and with replay,
    whose windows the saved sampler draws)."""
    write_task_sft(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig(vocab_size=320, block_size=128, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)),
                    tmp_path / "init.pt")
    args = [*replay, "--mode=sft", "--dataset=s", f"--data_root={tmp_path}/data", f"--init_from={tmp_path}/init.pt",
            "--block_size=128", "--batch_size=4", "--max_iters=8", "--eval_interval=4", "--eval_iters=2",
            "--log_interval=1", "--dtype=float32"]  # 8 steps x 3+ rows x 1+ of 24 examples: a new epoch
    for out, extra in (("straight", []), ("split", ["--stop_at_iter=4"]), ("split", ["--init_from=resume"])):
        r = run_script("train.py", *args, f"--out_dir={tmp_path}/{out}", *extra)
        assert r.returncode == 0, r.stderr
    losses = {out: [m["loss"] for m in read_metrics(tmp_path / out) if "loss" in m] for out in ("straight", "split")}
    assert len(losses["straight"]) == 8 and losses["split"] == losses["straight"]
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["data_state"]["epoch"] >= 1

"""prepare.py --kind=sft|dpo on files in the public datasets' shapes: SmolTalk's parquet `messages` and
UltraFeedback's whole-conversation pairs with scores, read row group by row group in worker processes;
the score margin, the too-long policy, the mix of weighted sources, and what a new user's files hold."""
import json
import re

import numpy as np
import pytest

import chat_data
from conftest import run_script, write_pretrain_data
from tokenizer import load_tokenizer

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

ENC = load_tokenizer("bytes")


def smoltalk(path, n, long_every=0):
    """n conversations as SmolTalk publishes them: messages (a list of {content, role}) and source."""
    rows = []
    for i in range(n):
        reply = f"answer {i}" + (" and on" * 100 if long_every and i % long_every == 0 else "")
        rows.append({"messages": [{"content": "Be brief.", "role": "system"}, {"content": f"question {i}?", "role": "user"},
                                  {"content": reply, "role": "assistant"}], "source": "smol-magpie-ultra"})
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)


def ultrafeedback(path, n):
    """n pairs as UltraFeedback (binarized) publishes them: prompt, prompt_id, chosen and rejected as whole
    conversations, messages, and the two scores."""
    rows = []
    for i in range(n):
        user = {"content": f"prompt {i}", "role": "user"}
        rows.append({"prompt": f"prompt {i}", "prompt_id": f"id{i}", "chosen": [user, {"content": f"good {i}", "role": "assistant"}],
                     "rejected": [user, {"content": f"bad {i}", "role": "assistant"}],
                     "messages": [user, {"content": f"good {i}", "role": "assistant"}],
                     "score_chosen": 8.0, "score_rejected": 8.0 - i % 4})
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)


def prep(tmp_path, out, kind, sources, *extra):
    write_pretrain_data(tmp_path / "pre", vocab_size=260)
    return run_script("prepare.py", f"--kind={kind}", f"--tokenizer_from={tmp_path}/pre", f"--sources={sources}",
                      f"--out_dir={tmp_path}/{out}", "--block_size=256", "--val_fraction=0.2", *extra)


def texts(folder, split, kind):
    tokens = np.fromfile(folder / f"{split}.bin", dtype=np.uint16).tolist()
    if kind == "sft":
        idx = np.fromfile(folder / f"{split}.idx", dtype=np.int64)
        return [ENC.decode(tokens[a:b]) for a, b in zip(idx, idx[1:])]
    rows = np.fromfile(folder / f"{split}.idx", dtype=np.int64).reshape(-1, 4)
    return [tuple(ENC.decode(tokens[a:b]) for a, b in zip(r, r[1:])) for r in rows]


def test_smoltalk_parquet_in_workers_the_same_as_one_and_too_long_dropped(tmp_path):
    for i in range(3):
        smoltalk(tmp_path / f"train-{i}.parquet", 40, long_every=10)
    sources = f"{{'smoltalk': '{tmp_path}/train-*.parquet'}}"
    one = prep(tmp_path, "one", "sft", sources, "--num_workers=1", "--too_long=drop")
    two = prep(tmp_path, "two", "sft", sources, "--num_workers=2", "--too_long=drop")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    for name in ("train.bin", "train.mask.bin", "train.idx", "val.bin", "val.idx"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert meta["too_long"] == {"policy": "drop", "truncated": 0, "dropped": 12}
    assert meta["train_examples"] + meta["val_examples"] == 108 and 8 < meta["val_examples"] < 40
    train = texts(tmp_path / "one", "train", "sft")
    assert train[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nquestion ")
    r = prep(tmp_path, "err", "sft", sources)  # the default stops at the first, naming it
    assert r.returncode != 0 and re.search(r"train-\d.parquet:1: \d+ tokens, longer than block_size=256", r.stderr)


def test_ultrafeedback_pairs_share_their_prompt_and_low_margins_are_left_out(tmp_path):
    ultrafeedback(tmp_path / "train_prefs.parquet", 40)
    r = prep(tmp_path, "dpo", "dpo", f"{{'uf': '{tmp_path}/train_prefs.parquet'}}", "--min_score_margin=2")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "dpo" / "meta.json").read_text())
    assert meta["low_margin"] == 20 and meta["train_pairs"] + meta["val_pairs"] == 20  # margins 0 and 1 out
    for prompt, chosen, rejected in texts(tmp_path / "dpo", "train", "dpo"):
        n = prompt.split("prompt ")[1].split("<")[0]
        assert prompt == f"<|im_start|>user\nprompt {n}<|im_end|>\n<|im_start|>assistant\n"
        assert (chosen, rejected) == (f"good {n}<|im_end|>", f"bad {n}<|im_end|>") and int(n) % 4 >= 2
    user = {"content": "p", "role": "user"}
    with pytest.raises(ValueError, match="its turns before the reply are not the prompt"):
        chat_data.to_pair({"prompt": "q", "chosen": [user, {"content": "a", "role": "assistant"}], "rejected": "b"})


def test_what_a_new_users_files_hold(tmp_path):
    """An Alpaca input of null is an empty input; an empty file among others is named; a parquet file
    of other columns names the file and both sets of columns; a malformed row names file:row."""
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"instruction": f"say {i}", "input": None, "output": f"{i}"})
                                                for i in range(20)) + "\n")
    (tmp_path / "b.jsonl").write_text("")
    r = prep(tmp_path, "sft", "sft", f"{{'mine': '{tmp_path}/*.jsonl'}}")
    assert r.returncode == 0, r.stderr
    assert f"warning: {tmp_path}/b.jsonl: no records" in r.stderr
    meta = json.loads((tmp_path / "sft" / "meta.json").read_text())
    assert meta["empty_files"] == [f"{tmp_path}/b.jsonl"] and meta["train_examples"] + meta["val_examples"] == 20
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "c.parquet")
    r = prep(tmp_path, "bad", "sft", f"{{'x': '{tmp_path}/c.parquet'}}")
    assert r.returncode != 0 and f"{tmp_path}/c.parquet: not sft records: expected the columns messages or " \
        "conversations or conversation or instruction, output; found text" in r.stderr and "Traceback" not in r.stderr
    smoltalk(tmp_path / "d.parquet", 10)
    table = pq.read_table(tmp_path / "d.parquet").to_pylist()
    table[3]["messages"][2]["role"] = "robot"
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "d.parquet")
    r = prep(tmp_path, "bad", "sft", f"{{'x': '{tmp_path}/d.parquet'}}")
    assert r.returncode != 0 and f"{tmp_path}/d.parquet:4: unknown role 'robot'" in r.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_weighted_sources_mix_by_examples(tmp_path):
    """Two sources of 40 and 120 conversations, weights 3 and 1: at temperature 1 each source's epochs are
    its weight times the total over sum(w n), so the small one's are 3x the large one's (about 2 and 2/3:
    examples repeated, or subsampled by seeded hashes), and the train split keeps its size."""
    smoltalk(tmp_path / "small.parquet", 40)
    (tmp_path / "big.jsonl").write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"big {i}"}, {"role": "assistant", "content": "ok"}]}) for i in range(120)) + "\n")
    r = prep(tmp_path, "mix", "sft", f"{{'small': '{tmp_path}/small.parquet', 'big': '{tmp_path}/big.jsonl'}}",
             "--mix_weights={'small': 3.0, 'big': 1.0}")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "mix" / "meta.json").read_text())
    small, big = meta["mix"]["small"], meta["mix"]["big"]
    assert small["epochs"] == pytest.approx(3 * big["epochs"], rel=1e-3)
    total = small["examples"] + big["examples"]
    assert small["epochs"] == pytest.approx(3 * total / (3 * small["examples"] + big["examples"]), rel=1e-3)
    train = texts(tmp_path / "mix", "train", "sft")
    n_small, n_big = sum("question" in t for t in train), sum("big " in t for t in train)
    assert n_small == pytest.approx(small["epochs"] * small["examples"], abs=4)
    assert n_big == pytest.approx(big["epochs"] * big["examples"], abs=12) and n_small + n_big == len(train)
    val = texts(tmp_path / "mix", "val", "sft")
    assert len(set(val)) == len(val) and not set(val) & set(train)  # val is not mixed, and held out

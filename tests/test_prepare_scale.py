"""prepare.py at scale: sharded sources (.jsonl, .jsonl.gz, .parquet), worker processes, cross-shard
deduplication, resuming after an interruption, and damaged input."""
import errno
import gzip
import json
import os
import random

import numpy as np
import pytest

import dedup
import prepare
import sources
from conftest import run_script

pq = pytest.importorskip("pyarrow.parquet")
import pyarrow as pa  # noqa: E402

VOCAB = [f"word{i}" for i in range(2000)]


def doc(rng, n=120):
    return "the and " + " ".join(rng.choice(VOCAB) for _ in range(n))


def perturb(text, rng, n_changes):
    words = text.split()
    for pos in rng.sample(range(2, len(words)), n_changes):
        words[pos] = f"new{rng.randrange(10 ** 6)}"
    return " ".join(words)


def write_shards(root, rng=None):
    """Three shards of each format; shard 2 of the parquet set repeats a document of jsonl shard 0
    with 2 of 122 words changed (a near duplicate), and a .gz line repeats one exactly."""
    rng = rng or random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(3):
        docs[f"a{i}"] = [doc(rng) for _ in range(15)]
        (root / f"a{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[f"a{i}"]))
        docs[f"b{i}"] = [doc(rng) for _ in range(15)]
        with gzip.open(root / f"b{i}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": d, "id": j}) + "\n" for j, d in enumerate(docs[f"b{i}"]))
        docs[f"c{i}"] = [doc(rng) for _ in range(15)]
        if i == 2:
            docs["c2"][5] = perturb(docs["a0"][3], rng, 2)
            docs["c2"][6] = docs["b1"][4]
        pq.write_table(pa.table({"text": docs[f"c{i}"], "n": list(range(15))}), root / f"c{i}.parquet",
                       row_group_size=4)
    return docs


def prep(root, out, *args, sources=None):
    sources = sources or f"{{'web': '{root}/shards'}}"
    return run_script("prepare.py", f"--out_dir={root}/{out}", "--tokenizer=bytes", "--val_fraction=0.2",
                      f"--sources={sources}", *args, cwd=root)


def read_docs(out):
    meta = json.loads((out / "meta.json").read_text())
    eot = meta["special_tokens"]["<|endoftext|>"]
    docs = {}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        ends = np.flatnonzero(ids == eot)
        docs[split] = [bytes(ids[s + 1 if k else 0:e].astype(np.uint8)).decode() for k, (s, e) in
                       enumerate(zip(np.r_[-1, ends[:-1]], ends))]
    return meta, docs


def same_output(a, b):
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ("train.bin", "val.bin"))


def test_sharded_formats_dedup_across_shards_and_workers(tmp_path):
    docs = write_shards(tmp_path / "shards")
    r1 = prep(tmp_path, "one", "--num_workers=1")
    r2 = prep(tmp_path, "two", "--num_workers=2", "--chunk_mb=0.002")  # jsonl split into ~2 KB byte ranges
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert same_output(tmp_path / "one", tmp_path / "two")
    meta, out = read_docs(tmp_path / "one")
    meta2 = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["run"]["units"] == 9 and meta2["run"]["units"] > 9
    meta.pop("run"), meta2.pop("run")
    assert json.dumps(meta) == json.dumps(meta2)  # all but how the run went, out_dir included
    assert meta["dedup"] == {"exact": 1, "near": 1}
    everything = set(out["train"]) | set(out["val"])
    assert docs["a0"][3] in everything and docs["c2"][5] not in everything  # the first of the pair stays
    assert len(everything) == 9 * 15 - 2 and not set(out["train"]) & set(out["val"])
    assert sorted(os.listdir(tmp_path)) == ["one", "shards", "two"]  # no tmp or work folders left


def test_split_independent_of_paths_and_order(tmp_path):
    docs = write_shards(tmp_path / "shards")
    (tmp_path / "elsewhere").mkdir()
    for f in (tmp_path / "shards").iterdir():  # the same shards under other names, in another order
        (tmp_path / "elsewhere" / ("z" + f.name if f.name.startswith("a") else f.name)).write_bytes(f.read_bytes())
    r1, r2 = prep(tmp_path, "x"), prep(tmp_path, "y", sources=f"{{'web': '{tmp_path}/elsewhere'}}")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    _, a = read_docs(tmp_path / "x")
    _, b = read_docs(tmp_path / "y")
    # the same split for every document; of the near-duplicate pair, the first in the new order stays
    pair = {docs["a0"][3], docs["c2"][5]}
    assert set(a["val"]) - pair == set(b["val"]) - pair and set(a["train"]) - pair == set(b["train"]) - pair
    assert len(pair & (set(a["train"]) | set(a["val"]))) == 1 and len(pair & (set(b["train"]) | set(b["val"]))) == 1


def test_jsonl_ranges_read_each_line_once_and_name_lines(tmp_path):
    rng = random.Random(1)
    lines = [json.dumps({"text": doc(rng, rng.randrange(60, 200))}) for _ in range(40)]
    src = tmp_path / "shards"
    src.mkdir()
    (src / "x.jsonl").write_text("\n".join(lines) + "\n")
    whole, split = prep(tmp_path, "whole"), prep(tmp_path, "split", "--chunk_mb=0.001", "--num_workers=2")
    assert whole.returncode == 0 and split.returncode == 0, whole.stderr + split.stderr
    assert same_output(tmp_path / "whole", tmp_path / "split")
    lines[33] = "{broken"
    (src / "x.jsonl").write_text("\n".join(lines) + "\n")
    r = prep(tmp_path, "bad", "--chunk_mb=0.001")
    assert r.returncode != 0 and f"{src}/x.jsonl:34:" in r.stderr and "Traceback" not in r.stderr


def test_interrupted_run_resumes_to_the_same_output(tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "shards")
    assert prep(tmp_path, "straight", "--num_workers=1").returncode == 0
    calls = []
    real = prepare.document_stage

    def dies_on_the_fourth_unit(task):
        calls.append(task[0])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(task)
    argv = ["prepare.py", f"--out_dir={tmp_path}/resumed", "--tokenizer=bytes", "--val_fraction=0.2",
            f"--sources={{'web': '{tmp_path}/shards'}}", "--num_workers=1"]
    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(prepare, "document_stage", dies_on_the_fourth_unit)
    with pytest.raises(SystemExit, match="resumes from"):
        prepare.main()
    assert not (tmp_path / "resumed").exists() and not (tmp_path / "resumed.tmp" / "meta.json").exists()
    assert len(list((tmp_path / "resumed.tmp" / "work").glob("docs-*.json"))) == 3
    calls.clear()
    monkeypatch.setattr(prepare, "document_stage", real)
    prepare.main()
    assert "reusing 3 of 9 finished units" in capsys.readouterr().out
    assert same_output(tmp_path / "straight", tmp_path / "resumed")
    assert not (tmp_path / "resumed.tmp").exists()


def test_killed_process_resumes(tmp_path):
    """A real kill -9 in the document stage (a worker sleeps on its third unit), then the same command."""
    import signal
    import subprocess
    import sys
    import time
    write_shards(tmp_path / "shards")
    assert prep(tmp_path, "straight", "--num_workers=1").returncode == 0
    hook = tmp_path / "hook.py"  # runs prepare.main with a slow third unit
    hook.write_text("import sys, time, prepare\nreal = prepare.document_stage\n"
                    "def slow(task):\n    if task[0] == 2: time.sleep(60)\n    return real(task)\n"
                    "prepare.document_stage = slow\nprepare.main()\n")
    args = [f"--out_dir={tmp_path}/killed", "--tokenizer=bytes", "--val_fraction=0.2",
            f"--sources={{'web': '{tmp_path}/shards'}}", "--num_workers=1"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(prepare.__file__)}
    p = subprocess.Popen([sys.executable, str(hook), *args], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "killed.tmp" / "work"
    deadline = time.time() + 60
    while len(list(work.glob("docs-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "killed").exists()
    r = run_script("prepare.py", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reusing 2 of 9" in r.stdout
    assert same_output(tmp_path / "straight", tmp_path / "killed")


def test_damaged_shards(tmp_path):
    write_shards(tmp_path / "shards")
    good = (tmp_path / "shards" / "b1.jsonl.gz").read_bytes()
    (tmp_path / "shards" / "b1.jsonl.gz").write_bytes(good[:len(good) // 2])  # truncated gzip
    r = prep(tmp_path, "out")
    assert r.returncode != 0 and "b1.jsonl.gz: cannot be read" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "shards" / "b1.jsonl.gz").write_bytes(good)
    (tmp_path / "shards" / "c0.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    r = prep(tmp_path, "out")
    assert r.returncode != 0 and "c0.parquet: cannot be read" in r.stderr and "Traceback" not in r.stderr
    r = prep(tmp_path, "out", "--on_error=skip")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["read"]["skipped_files"] == 1
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "shards" / "c0.parquet")
    r = prep(tmp_path, "out2", "--on_error=skip")
    assert r.returncode != 0 and "c0.parquet: no column 'text' (columns: content)" in r.stderr


def test_disk_full_leaves_no_dataset(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards")

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    monkeypatch.setattr("sys.argv", ["prepare.py", f"--out_dir={tmp_path}/out", "--tokenizer=bytes",
                                     f"--sources={{'web': '{tmp_path}/shards'}}", "--num_workers=1"])
    monkeypatch.setattr(prepare, "write_split", full)
    with pytest.raises(SystemExit, match="disk full"):
        prepare.main()
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_a_dataset(tmp_path):
    write_shards(tmp_path / "shards")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = prep(tmp_path, "mine", "--overwrite=True")
    assert r.returncode != 0 and "holds no meta.json" in r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert prep(tmp_path, "out").returncode == 0
    r = prep(tmp_path, "out", "--overwrite=True", "--val_fraction=0.3")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["config"]["val_fraction"] == 0.3
    assert sorted(os.listdir(tmp_path)) == ["mine", "out", "shards"]


def test_missing_pyarrow_is_one_line(tmp_path):
    write_shards(tmp_path / "shards")
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "pyarrow.py").write_text("raise ImportError('no pyarrow here')\n")
    r = run_script("prepare.py", f"--out_dir={tmp_path}/out", "--tokenizer=bytes",
                   f"--sources={{'web': '{tmp_path}/shards/c*.parquet'}}", cwd=tmp_path,
                   env={"PYTHONPATH": str(blocker)})
    assert r.returncode != 0 and "pip install pyarrow" in r.stderr and "Traceback" not in r.stderr


def test_default_corpus_removals():
    """The embedded corpus through the streaming pipeline: the rule filters remove what they removed
    before it (27, 26, 44, 5, 26, 4); near duplicates are 15, not 13, since shingles are now the
    filters' words (punctuation dropped) and hashed by another universal family."""
    cfg = {**prepare.defaults, "num_workers": 2}
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "work")
        os.makedirs(work)
        units = sources.list_units(cfg)
        reports = dict(sources.in_workers(prepare.document_stage, [(i, u, cfg, work) for i, u in enumerate(units)],
                                          2, "documents"))
        removed = {}
        for r in reports.values():
            for rule, rep in r["filters"].items():
                removed[rule] = removed.get(rule, 0) + rep["removed"]
        assert removed == {"max_dup_ngram_frac": 27, "min_chars": 26, "min_stopwords": 44,
                           "min_unique_word_ratio": 5, "max_dup_line_frac": 26, "min_alpha_ratio": 4}
        _, counts = dedup.deduplicate(prepare.Documents(work, len(units)), cfg)
        assert counts == {"exact": 1, "near": 15}

"""
Malformed inputs against the command line of a checkout, counted by outcome: refused with a message
(non-zero exit, no traceback), traceback, or silently accepted (exit 0). The cases are the test
suite's (tests/test_hardening.py): out-of-range config values of train.py and prepare.py, bad chat
records through prepare.py --kind=sft|dpo, damaged datasets through train.py.

    python bench/fuzz_inputs.py                      # this checkout
    git worktree add /tmp/old HEAD~3 && python bench/fuzz_inputs.py --root=/tmp/old   # an earlier one
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from conftest import TINY, write_pretrain_data  # noqa: E402
from test_hardening import DPO_BAD, PREPARE_BAD, SFT_BAD, TRAIN_BAD, corrupt  # noqa: E402

DAMAGE = ["truncated_meta", "vocab_string", "vocab_null", "odd_length", "empty_val", "mid_file_id",
          "count_mismatch", "tokenizer_escape", "specials_out_of_range"]


def outcome(root, script, args, cwd):
    r = subprocess.run([sys.executable, os.path.join(root, script), *args], capture_output=True, text=True,
                       cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if "Traceback" in r.stderr:
        return "traceback"
    return "accepted" if r.returncode == 0 else "message"


def text(value):
    """value as --key=VALUE text that ast.literal_eval reads back (inf as 1e999; NaN has no literal)."""
    return "1e999" if value == float("inf") else repr(value)


def cases(tmp):
    """(name, script, args) of every case, with the files they need written under tmp."""
    data = tmp / "data"
    train = [f"--data_root={data}", "--max_iters=1", "--eval_interval=0", *TINY]
    write_pretrain_data(data / "tiny")
    for key, value in TRAIN_BAD:
        if value == value:  # not NaN
            yield f"train {key}={text(value)}", "train.py", [*train, f"--out_dir={tmp}/o", f"--{key}={text(value)}"]
    for key, value in PREPARE_BAD:
        yield f"prepare {key}={text(value)}", "prepare.py", [f"--out_dir={tmp}/p", f"--{key}={text(value)}",
                                                         "--sources={'s': 'embedded:pydoc'}"]
    for kind, bad in (("sft", SFT_BAD), ("dpo", DPO_BAD)):
        good = (json.dumps({"instruction": "q", "output": "a"}) if kind == "sft" else
                json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}))
        for i, (line, _) in enumerate(bad):
            path = tmp / f"{kind}{i}.jsonl"
            path.write_text("\n".join([good] * 10 + [line] + [good] * 10) + "\n")
            yield f"{kind} record {line[:40]!r}", "prepare.py", [
                f"--kind={kind}", f"--tokenizer_from={data}/tiny", f"--sources={{'c': '{path}'}}", "--block_size=128",
                f"--out_dir={tmp}/{kind}{i}", "--val_fraction=0.3"]
    for how in DAMAGE:
        write_pretrain_data(data / how)
        corrupt(data / how, how)
        yield f"train data {how}", "train.py", [*train, f"--dataset={how}", f"--out_dir={tmp}/d-{how}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=ROOT, help="the checkout whose scripts to run")
    args = ap.parse_args()
    counts, by_case = Counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, argv in cases(Path(tmp)):
            result = outcome(args.root, script, argv, tmp)
            counts[result] += 1
            by_case.append((result, name))
            print(f"{result:<10} {name}", flush=True)
    print(f"\n{args.root}: {sum(counts.values())} malformed inputs: {counts['message']} refused with a message, "
          f"{counts['traceback']} tracebacks, {counts['accepted']} silently accepted")


if __name__ == "__main__":
    main()

"""Small benchmark files in each dataset's published schema (the columns and types of the parquet files
that prepare.py --download=NAME fetches), with the real files' quirks: HellaSwag's WikiHow brackets,
double spaces and string labels; ARC's numeric labels and five-choice items; MMLU's subjects with their
dev examples; GSM8K's worked answers with <<...>> annotations and thousands separators. Written by the
project for the tests and bench/benchmarks_vs_harness.py; nothing is downloaded."""
import os
import random

WORDS = ("the cat sat on a warm mat while rain fell over hills and rivers near old stone towers where "
         "people gather bread and fish to share with friends after long days of quiet work").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write(root, n=12, seed=0):
    """data/raw-style folders under root: hellaswag/, arc_easy/, arc_challenge/, mmlu/, gsm8k/, each file at
    its published path (download.PRESETS). n items per test file (MMLU: per subject)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from download import PRESETS
    rng = random.Random(seed)

    def save(name, index, table):
        path = os.path.join(root, name, PRESETS[name]["files"][index])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path)

    rows = []
    for i in range(n):
        wikihow = i % 2 == 0
        ctx_a = ("[header] How to " + sentence(rng, 4) + " [title] " + sentence(rng, 5) + "  [step] " + sentence(rng, 6)
                 if wikihow else sentence(rng, 12).capitalize() + ".")
        ctx_b = sentence(rng, 3) if i % 3 else "THE " + sentence(rng, 2)
        rows.append({"ind": 1000 + i, "activity_label": "Personal Care" if wikihow else "Playing guitar",
                     "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx_a + " " + ctx_b,
                     "endings": [sentence(rng, rng.randrange(3, 12)) + (" [substeps] " + sentence(rng, 3) if wikihow and k == 1
                                                                         else "") for k in range(4)],
                     "source_id": f"wikihow~{i}" if wikihow else f"activitynet~v_{i}", "split": "val",
                     "split_type": "indomain", "label": str(rng.randrange(4))})
    save("hellaswag", 0, pa.Table.from_pylist(rows))

    for name in ("arc_easy", "arc_challenge"):
        rows = []
        for i in range(n):
            k = 5 if i % 5 == 4 else 3 if i % 7 == 3 else 4
            labels = [str(j + 1) for j in range(k)] if i % 4 == 1 else list("ABCDE"[:k])
            rows.append({"id": f"Mercury_{name}_{i}", "question": sentence(rng, 8).capitalize() + "?",
                         "choices": {"text": [sentence(rng, rng.randrange(1, 6)) for _ in range(k)], "label": labels},
                         "answerKey": rng.choice(labels)})
        save(name, 0, pa.Table.from_pylist(rows))

    for index, count in ((0, n), (1, 5)):  # test, then the 5 dev examples per subject
        rows = [{"question": " " + sentence(rng, 7).capitalize() + "?" + ("\n" if j % 3 == 0 else ""),
                 "subject": subject, "choices": [sentence(rng, rng.randrange(1, 4)) for _ in range(4)],
                 "answer": rng.randrange(4)}
                for subject in ("abstract_algebra", "high_school_us_history") for j in range(count)]
        save("mmlu", index, pa.Table.from_pylist(rows))

    for index, count in ((0, n), (1, 3 * n)):  # test, train
        rows = []
        for i in range(count):
            a, b = rng.randrange(2, 90), rng.randrange(100, 4000)
            total = a * b
            rows.append({"question": f"{sentence(rng, 6).capitalize()} {a} boxes of {b} apples each. How many apples?",
                         "answer": f"There are {a} boxes of {b} apples.\n{a} * {b} = <<{a}*{b}={total}>>{total}\n"
                                   f"#### {total:,}"})
        save("gsm8k", index, pa.Table.from_pylist(rows))


def harness_tasks(root, out):
    """lm-evaluation-harness task files (YAML) in folder out that run its own definitions of the benchmarks
    (each includes the installed package's task YAML) on the files under root, offline: {our benchmark
    name: [the harness's task names]}. MMLU's subjects become one file each, as the harness's tasks are."""
    import importlib.util
    import pyarrow as pa
    import pyarrow.parquet as pq
    from download import PRESETS
    tasks_dir = os.path.join(importlib.util.find_spec("lm_eval").submodule_search_locations[0], "tasks")
    os.makedirs(out, exist_ok=True)

    def task(name, include, files, extra=""):
        data_files = "".join(f"    {split}: {path}\n" for split, path in files.items())
        with open(os.path.join(out, name + ".yaml"), "w") as f:
            f.write(f"include: {os.path.join(tasks_dir, include)}\ntask: {name}\ndataset_path: parquet\n"
                    f"dataset_name: null\ndataset_kwargs:\n  data_files:\n{data_files}{extra}")
        return name

    def path(name, i):
        return os.path.join(root, name, PRESETS[name]["files"][i])

    names = {"hellaswag": [task("hellaswag_local", "hellaswag/hellaswag.yaml", {"validation": path("hellaswag", 0)},
                                "training_split: null\n")],
             "gsm8k": [task("gsm8k_local", "gsm8k/gsm8k.yaml", {"test": path("gsm8k", 0), "train": path("gsm8k", 1)})]}
    for name in ("arc_easy", "arc_challenge"):
        names[name] = [task(f"{name}_local", "arc/arc_easy.yaml", {"test": path(name, 0)},
                            "training_split: null\nvalidation_split: null\n")]
    test, dev = (pq.read_table(path("mmlu", i)).to_pylist() for i in (0, 1))
    names["mmlu"], names["mmlu_5shot"] = [], []
    for subject in dict.fromkeys(r["subject"] for r in test):
        files = {}
        for split, rows in (("test", test), ("dev", dev)):
            files[split] = os.path.join(out, f"mmlu_{subject}_{split}.parquet")
            pq.write_table(pa.Table.from_pylist([r for r in rows if r["subject"] == subject]), files[split])
        description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
        for shots, name in ((0, "mmlu"), (5, "mmlu_5shot")):
            names[name].append(task(f"mmlu{shots}_{subject}", "mmlu/default/_default_template_yaml", files,
                                    f'description: "{description}\\n\\n"\nnum_fewshot: {shots}\n'))
    return names

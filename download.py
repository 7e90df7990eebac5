"""
The one step that uses the network, and only when asked: prepare.py --download=NAME fetches the parquet
files of a public dataset over HTTPS, resumably: numbered shards of a corpus, or a benchmark's files.

    python prepare.py --download=climbmix --shards=8                  # data/raw/climbmix/shard_00000..7.parquet
    python prepare.py --download='https://host/data/part_{index:04d}.parquet' --first_shard=10 --shards=5
    python prepare.py --download=hellaswag                            # data/raw/hellaswag/data/validation-...

A complete file is skipped; a file is written as NAME.partial and renamed once its size matches
Content-Length (and a parquet file ends with its PAR1 footer); a dropped connection is retried after
growing waits, resuming with an HTTP Range request; a 404 or a final failure names the URL and exits.
"""
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from configurator import progress

# Named datasets for --download, as published on the Hugging Face hub (hub_url/datasets/REPO/resolve/main/
# PATH). climbmix: nanochat's pretraining corpus, NVIDIA's ClimbMix reshuffled into 6,543 parquet shards
# (indices 0-6542) with a `text` column (nanochat's nanochat/dataset.py downloads it from the same address
# and keeps the last shard for its validation split; here any shard can be used, since prepare.py splits
# by document hash). The benchmarks (the files evaluate.py scores, benchmarks.py) and the chat data
# (prepare.py --kind=sft|dpo reads the parquet files as they are): each file kept at its published PATH
# under download_dir.
PRESETS = {
    "climbmix": {"repo": "karpathy/climbmix-400b-shuffle", "shards": "shard_{index:05d}.parquet", "last": 6542},
    "hellaswag": {"repo": "Rowan/hellaswag", "files": ["data/validation-00000-of-00001.parquet"]},
    "arc_easy": {"repo": "allenai/ai2_arc", "files": ["ARC-Easy/test-00000-of-00001.parquet"]},
    "arc_challenge": {"repo": "allenai/ai2_arc", "files": ["ARC-Challenge/test-00000-of-00001.parquet"]},
    "mmlu": {"repo": "cais/mmlu", "files": ["all/test-00000-of-00001.parquet", "all/dev-00000-of-00001.parquet"]},
    "gsm8k": {"repo": "openai/gsm8k", "files": ["main/test-00000-of-00001.parquet",
                                                "main/train-00000-of-00001.parquet"]},
    # chat data: SmolTalk's small version (SFT; column messages) and UltraFeedback binarized (preferences)
    "smol-smoltalk": {"repo": "HuggingFaceTB/smol-smoltalk", "files": [
        *(f"data/train-0000{i}-of-00004.parquet" for i in range(4)), "data/test-00000-of-00001.parquet"]},
    "ultrafeedback": {"repo": "HuggingFaceH4/ultrafeedback_binarized", "files": [
        "data/train_prefs-00000-of-00001.parquet", "data/test_prefs-00000-of-00001.parquet"]},
}


def preset_url(name, path, hub_url):
    return f"{hub_url.rstrip('/')}/datasets/{PRESETS[name]['repo']}/resolve/main/{path}"


def download(cfg):
    """Fetch a preset's files, or shards first_shard .. first_shard+shards-1 of a sharded preset or of a URL
    template, into download_dir. A complete file is skipped; each is written as NAME.partial and renamed
    when its size checks out; a broken connection is retried (resuming with an HTTP Range request) after
    growing waits."""
    name = cfg["download"]
    preset = PRESETS.get(name)
    out = cfg["download_dir"] or os.path.join("data", "raw", name if preset else "download")
    if preset and "files" in preset:
        for path in preset["files"]:
            fetch(preset_url(name, path, cfg["hub_url"]), os.path.join(out, path), cfg["retries"], cfg["retry_wait"])
        print(f"{len(preset['files'])} files of {name} in {out}")
        return
    template = preset_url(name, preset["shards"], cfg["hub_url"]) if preset else name
    if "{index" not in template:
        sys.exit(f"download='{name}' is neither a preset ({', '.join(PRESETS)}) nor a URL template with "
                 "{index}, e.g. 'https://host/data/part_{index:04d}.parquet'")
    indices = range(cfg["first_shard"], cfg["first_shard"] + cfg["shards"])
    if cfg["shards"] < 1 or cfg["first_shard"] < 0 or (preset and indices[-1] > preset["last"]):
        sys.exit(f"shards={cfg['shards']} from first_shard={cfg['first_shard']}: indices must lie in "
                 f"[0, {preset['last'] if preset else 'any'}]")
    os.makedirs(out, exist_ok=True)
    for i in indices:
        url = template.format(index=i)
        fetch(url, os.path.join(out, os.path.basename(urllib.parse.urlparse(url).path)), cfg["retries"],
              cfg["retry_wait"])
    print(f"{len(indices)} shards in {out}: python prepare.py --sources=\"{{'{name if preset else 'web'}': "
          f"'{out}/*.parquet'}}\" ...")


def fetch(url, path, retries, wait):
    if os.path.exists(path):
        print(f"have {path}")
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part, problem = path + ".partial", None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(wait * 2 ** (attempt - 1))
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                if have and r.status != 206:  # the server ignored the range: start over
                    have = 0
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, progress(
                        total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            size = os.path.getsize(part)
            if total is not None and size != total:
                problem = f"connection ended at {size:,} of {total:,} bytes"
            elif path.endswith(".parquet") and not parquet_footer_ok(part):
                os.remove(part)
                problem = "not a complete parquet file (no PAR1 footer)"
            else:
                os.replace(part, path)
                return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the partial file is already as long as the resource
                os.remove(part)
            elif e.code not in (408, 429) and e.code < 500:
                sys.exit(f"{url}: HTTP {e.code} {e.reason}")
            problem = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        print(f"{url}: {problem}; {'retrying' if attempt < retries else 'giving up'}", file=sys.stderr)
    sys.exit(f"{url}: failed after {retries + 1} tries ({problem}); run again to resume {part}")


def parquet_footer_ok(path):
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 8:
            return False
        f.seek(-4, os.SEEK_END)
        return f.read(4) == b"PAR1"

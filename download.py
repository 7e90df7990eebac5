"""
The one step that uses the network, and only when asked: prepare.py --download=NAME fetches numbered
parquet shards of a public corpus over HTTPS, resumably.

    python prepare.py --download=climbmix --shards=8                  # data/raw/climbmix/shard_00000..7.parquet
    python prepare.py --download='https://host/data/part_{index:04d}.parquet' --first_shard=10 --shards=5

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

# Named corpora for --download. climbmix: nanochat's pretraining corpus, NVIDIA's ClimbMix reshuffled
# into 6,543 parquet shards (indices 0-6542) with a `text` column, as published on the Hugging Face hub
# (nanochat's nanochat/dataset.py downloads it from the same address and keeps the last shard for its
# validation split; here any shard can be used, since prepare.py splits by document hash).
PRESETS = {"climbmix": {"url": "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
                               "shard_{index:05d}.parquet", "last": 6542}}


def download(cfg):
    """Fetch shards first_shard .. first_shard+shards-1 of a preset or a URL template into download_dir.
    A complete file is skipped; each is written as NAME.partial and renamed when its size checks out;
    a broken connection is retried (resuming with an HTTP Range request) after growing waits."""
    name = cfg["download"]
    preset = PRESETS.get(name)
    template = preset["url"] if preset else name
    if "{index" not in template:
        sys.exit(f"download='{name}' is neither a preset ({', '.join(PRESETS)}) nor a URL template with "
                 "{index}, e.g. 'https://host/data/part_{index:04d}.parquet'")
    indices = range(cfg["first_shard"], cfg["first_shard"] + cfg["shards"])
    if cfg["shards"] < 1 or cfg["first_shard"] < 0 or (preset and indices[-1] > preset["last"]):
        sys.exit(f"shards={cfg['shards']} from first_shard={cfg['first_shard']}: indices must lie in "
                 f"[0, {preset['last'] if preset else 'any'}]")
    out = cfg["download_dir"] or os.path.join("data", "raw", name if preset else "download")
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

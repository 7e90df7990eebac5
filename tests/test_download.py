"""prepare.py --download against a local HTTP server on 127.0.0.1 that serves generated parquet shards,
honours Range requests, drops one connection mid-file and answers 404 for a missing shard."""
import http.server
import io
import threading

import pytest

from conftest import run_script

pq = pytest.importorskip("pyarrow.parquet")
import pyarrow as pa  # noqa: E402


def shard(i):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"the and document {i}-{j} " + "word " * 200 for j in range(50)]}), buf)
    return buf.getvalue()


class Server:
    def __init__(self, files, drop_once=()):
        self.files, self.drop_once, self.requests = files, set(drop_once), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path if self.path in server.files else self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.drop_once:  # half the body, then the connection goes away
                    server.drop_once.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server({f"part_{i:03d}.parquet": shard(i) for i in range(3)}, drop_once={"part_001.parquet"})
    yield s
    s.close()


def download(server, tmp_path, *args):
    return run_script("prepare.py", f"--download={server.url}/data/part_{{index:03d}}.parquet",
                      f"--download_dir={tmp_path}/raw", "--retry_wait=0.01", *args, cwd=tmp_path)


def test_download_resumes_a_dropped_file_and_skips_complete_ones(server, tmp_path):
    r = download(server, tmp_path, "--shards=3")
    assert r.returncode == 0, r.stderr
    for i in range(3):
        assert (tmp_path / "raw" / f"part_{i:03d}.parquet").read_bytes() == server.files[f"part_{i:03d}.parquet"]
    assert not list((tmp_path / "raw").glob("*.partial"))
    half = len(server.files["part_001.parquet"]) // 2
    assert ("part_001.parquet", f"bytes={half}-") in server.requests  # resumed where the drop left it
    assert "part_001.parquet" in r.stderr and "retrying" in r.stderr
    server.requests.clear()
    r = download(server, tmp_path, "--shards=3")
    assert r.returncode == 0 and server.requests == []  # all complete: nothing fetched
    r = run_script("prepare.py", f"--sources={{'web': '{tmp_path}/raw/*.parquet'}}", f"--out_dir={tmp_path}/data",
                   "--tokenizer=bytes", "--dedup_near=False", "--min_unique_word_ratio=0", "--max_dup_ngram_frac=0",
                   "--max_dup_line_frac=0", "--val_fraction=0.2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_download_404_names_the_url(server, tmp_path):
    r = download(server, tmp_path, "--shards=5")  # shards 3 and 4 do not exist
    assert r.returncode != 0 and f"{server.url}/data/part_003.parquet: HTTP 404" in r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "raw" / "part_002.parquet").exists()  # what came before is kept


def test_download_gives_up_naming_the_url(tmp_path):
    s = Server({"part_000.parquet": shard(0)}, drop_once={"part_000.parquet"})
    try:
        r = download(s, tmp_path, "--shards=1", "--retries=0")
        assert r.returncode != 0 and "part_000.parquet: failed after 1 tries" in r.stderr
        assert "run again to resume" in r.stderr and (tmp_path / "raw" / "part_000.parquet.partial").exists()
        r = download(s, tmp_path, "--shards=1")
        assert r.returncode == 0 and (tmp_path / "raw" / "part_000.parquet").read_bytes() == s.files["part_000.parquet"]
    finally:
        s.close()


def test_download_preset_and_bad_names(tmp_path):
    r = run_script("prepare.py", "--download=nosuchcorpus", cwd=tmp_path)
    assert r.returncode != 0 and "neither a preset (climbmix, hellaswag" in r.stderr
    r = run_script("prepare.py", "--download=climbmix", "--first_shard=6540", "--shards=5", cwd=tmp_path)
    assert r.returncode != 0 and "[0, 6542]" in r.stderr


def test_climbmix_data_config_is_valid(tmp_path):
    """config/data/climbmix.py holds only known keys; without the shards it says what is missing."""
    import os
    from conftest import ROOT
    r = run_script("prepare.py", os.path.join(ROOT, "config", "data", "climbmix.py"), cwd=tmp_path)
    assert r.returncode != 0 and "source 'data/raw/climbmix/*.parquet' matches no files" in r.stderr


def test_benchmark_presets_keep_the_published_paths(tmp_path):
    """--download=NAME for a benchmark or chat data fetches each file from hub_url/datasets/REPO/resolve/main/PATH (the
    dataset page's address) into download_dir/PATH, where evaluate.py and the data configs look."""
    from download import PRESETS
    paths = [(name, path) for name, p in PRESETS.items() if "files" in p for path in p["files"]]
    files = {f"/datasets/{PRESETS[name]['repo']}/resolve/main/{path}": shard(k) for k, (name, path) in enumerate(paths)}
    s = Server(files)
    try:
        for name in dict.fromkeys(name for name, _ in paths):  # the benchmarks and the chat data
            r = run_script("prepare.py", f"--download={name}", f"--hub_url={s.url}", "--retry_wait=0.01", cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            for path in PRESETS[name]["files"]:
                assert (tmp_path / "data" / "raw" / name / path).read_bytes() == shard(paths.index((name, path)))
        assert len(s.requests) == len(files)  # ARC's two test files share a name but not a path
    finally:
        s.close()

"""weights/download.py against a fake hub on 127.0.0.1; nothing here contacts any other address.

FakeHub serves what download.py relies on, as the Hugging Face hub documents it: the tree API
(`/api/{models,datasets}/{repo}/tree/{revision}?recursive=true`, paged with a Link header; each
file with its size, its git blob id as `oid`, and for LFS files `lfs.oid` = sha256), resolve URLs
(`/{repo}/resolve/{revision}/{path}`, `/datasets/{repo}/resolve/...`) that answer small files
directly and redirect LFS files to a CDN on another port, Range requests, and gated repos (401
without a token, 403 with the wrong one). It records every request so the tests can assert on
them, and it can drop a connection halfway, serve damaged bytes, or answer 404.
"""

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections import namedtuple
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from weights import download

ROOT = Path(__file__).resolve().parents[1]
CLIP_REPO = "openai/clip-vit-base-patch32"
SD_REPO = "CompVis/stable-diffusion-v1-4"
LFS_SUFFIXES = (".safetensors", ".bin", ".zip")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fake_weights(n_bytes, seed):
    return bytes((i * 7 + seed) % 251 for i in range(n_bytes))


class FakeHub:
    def __init__(self):
        self.files = {}  # (kind, repo, revision) -> {path in repo: bytes}
        self.static = {}  # plain URL path -> bytes (the COCO server)
        self.gated = {}  # repo -> the token that opens it
        self.missing = set()  # paths that are listed but answer 404
        self.corrupt = set()  # paths served with one byte changed (the listing keeps the true sha256)
        self.drop_once = set()  # paths whose next download stops halfway through
        self.errors = {}  # path in repo -> status codes its next requests answer, in order
        self.page_size = 1000
        self.next_host = "127.0.0.1"  # the host the listing's Link: rel="next" names
        self.next_link = None  # (this page's URL, next page's URL) -> the Link to send instead, or None for none
        self.edit = None  # entries -> the entries the tree API lists instead
        self.tree_body = None  # bytes the tree API answers (200) instead of the listing
        self.requests = []  # (server, method, path, headers)
        self.blobs = {}  # sha256 -> bytes the CDN serves
        self.servers = [self._start("hub"), self._start("cdn")]
        self.url = f"http://127.0.0.1:{self.servers[0].server_port}"
        self.cdn_url = f"http://127.0.0.1:{self.servers[1].server_port}"

    def _start(self, role):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append((role, "GET", self.path, dict(self.headers)))
                hub.handle(role, self)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return server

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def resolves(self):
        """Paths of the file downloads (hub resolve URLs and CDN blobs), in order."""
        return [path for role, _, path, _ in self.requests if role == "cdn" or "/resolve/" in path]

    def handle(self, role, h):
        path = urlsplit(h.path).path
        if role == "cdn":
            return self.send(h, self.blobs[path.rsplit("/", 1)[1]], path)
        if path in self.static:
            return self.send(h, self.static[path], path)
        parts = [unquote(p) for p in path.split("/")[1:]]  # split first: revisions may hold %2F
        if parts[0] == "api":  # api, models|datasets, org, name, tree, revision
            return self.tree(h, parts[1][:-1], "/".join(parts[2:4]), parts[5])
        kind = "dataset" if parts[0] == "datasets" else "model"
        parts = parts[1:] if kind == "dataset" else parts
        repo, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo in self.gated:
            auth = h.headers.get("Authorization")
            if auth != f"Bearer {self.gated[repo]}":
                return self.status(h, 401 if auth is None else 403)
        files = self.files.get((kind, repo, revision), {})
        if self.errors.get(file):
            return self.status(h, self.errors[file].pop(0))
        if file not in files or file in self.missing:
            return self.status(h, 404)
        data = files[file]
        served = data[:-1] + bytes([data[-1] ^ 1]) if file in self.corrupt else data
        if file.endswith(LFS_SUFFIXES):  # the hub redirects LFS files to its CDN
            self.blobs[sha256(data)] = served
            if file in self.drop_once:
                self.drop_once.discard(file)
                self.drop_once.add(f"/blobs/{sha256(data)}")
            h.send_response(302)
            h.send_header("Location", f"{self.cdn_url}/blobs/{sha256(data)}")
            h.send_header("X-Linked-Etag", f'"{sha256(data)}"')
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        return self.send(h, served, file)

    def tree(self, h, kind, repo, revision):
        files = self.files.get((kind, repo, revision))
        if files is None:
            return self.status(h, 404)
        if self.tree_body is not None:
            return self.send(h, self.tree_body, "tree")
        entries = []
        for path, data in sorted(files.items()):
            if path.endswith(LFS_SUFFIXES):
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n"
                entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_id(pointer.encode()),
                                "lfs": {"oid": sha256(data), "size": len(data), "pointerSize": len(pointer)}})
            else:
                entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)})
        folders = {p.rsplit("/", 1)[0] for p in files if "/" in p}
        entries += [{"type": "directory", "path": f, "size": 0, "oid": "0" * 40} for f in sorted(folders)]
        entries = self.edit(entries) if self.edit else entries
        start = int(dict(kv.split("=") for kv in urlsplit(h.path).query.split("&")).get("cursor", 0))
        body = json.dumps(entries[start:start + self.page_size]).encode()
        h.send_response(200)
        if start + self.page_size < len(entries):
            nxt = (f"http://{self.next_host}:{self.servers[0].server_port}/api/{kind}s/{repo}/tree/"
                   f"{quote(revision, safe='')}?recursive=true&cursor={start + self.page_size}")
            nxt = self.next_link(f"{self.url}{h.path}", nxt) if self.next_link else nxt
            if nxt:
                h.send_header("Link", f'<{nxt}>; rel="next"')
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        return None

    def send(self, h, data, key):
        ranged = h.headers.get("Range")
        start = int(ranged.removeprefix("bytes=").split("-")[0]) if ranged else 0
        body = data[start:]
        h.send_response(206 if ranged else 200)
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if key in self.drop_once:  # promise the whole body, send half, hang up
            self.drop_once.discard(key)
            h.wfile.write(body[:len(body) // 2])
            h.close_connection = True
            return
        h.wfile.write(body)

    def status(self, h, code):
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()


@pytest.fixture
def hub(monkeypatch):
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)  # talk to 127.0.0.1 directly, never through a proxy
    fake = FakeHub()
    yield fake
    fake.close()


def add_clip(hub):
    """openai/clip-vit-base-patch32 as on the hub: no safetensors on main, one in refs/pr/15."""
    files = {"config.json": b'{"model_type": "clip"}', "vocab.json": b'{"hello</w>": 0}',
             "merges.txt": b"#version: 0.2\nh e\n", "tokenizer_config.json": b"{}",
             "pytorch_model.bin": b"pickled" * 100}
    weights = fake_weights(300_000, seed=1)
    hub.files[("model", CLIP_REPO, "main")] = files
    hub.files[("model", CLIP_REPO, "refs/pr/15")] = {**files, "model.safetensors": weights}
    return files, weights


def add_sd(hub, fp16_on_main=(), fp16_branch=()):
    """CompVis/stable-diffusion-v1-4 in diffusers layout (small stand-in contents)."""
    files = {path: (fake_weights(50_000 + i, seed=i) if path.endswith(".safetensors") else b'{"n": %d}' % i)
             for i, path in enumerate(download.SD_FILES)}
    for path in fp16_on_main:
        files[path.replace(".safetensors", ".fp16.safetensors")] = fake_weights(25_000, seed=len(path))
    hub.files[("model", SD_REPO, "main")] = files
    if fp16_branch:
        hub.files[("model", SD_REPO, "fp16")] = {p: fake_weights(20_000, seed=len(p) + 3) for p in fp16_branch}
    return files


def clip(hub, folder, **kwargs):
    return download.download_repo(*download.model_plan("clip-vit-base-patch32"), folder, hub.url, backoff=0, **kwargs)


def run_script(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT") and "proxy" not in k.lower()}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "weights" / "download.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=60)


def test_full_download_as_a_user_would(hub, tmp_path):
    files, weights = add_clip(hub)
    hub.page_size = 2  # make the listing span several pages
    result = run_script("clip-vit-base-patch32", "--dir", tmp_path, env_extra={"HF_ENDPOINT": hub.url})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "clip-vit-base-patch32"
    expected = {**{k: v for k, v in files.items() if k != "pytorch_model.bin"}, "model.safetensors": weights}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == expected  # no .part, no .bin left
    assert not any(path.endswith(".bin") for path in hub.resolves()), "a pickle was downloaded"
    assert any("/resolve/refs%2Fpr%2F15/model.safetensors" in path for path in hub.resolves())
    assert sum("cursor=" in path for _, _, path, _ in hub.requests) >= 2, "listing pages were not followed"


def test_interrupted_download_resumes_with_range(hub, tmp_path):
    _, weights = add_clip(hub)
    hub.drop_once.add("model.safetensors")
    clip(hub, tmp_path)
    blob_gets = [headers for role, _, _, headers in hub.requests if role == "cdn"]
    assert len(blob_gets) == 2
    assert "Range" not in blob_gets[0]
    assert blob_gets[1]["Range"] == f"bytes={len(weights) // 2}-"
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert not (tmp_path / "model.safetensors.part").exists()


def test_checksum_mismatch_leaves_nothing_at_the_final_path(hub, tmp_path):
    add_clip(hub)
    hub.corrupt.add("model.safetensors")
    with pytest.raises(download.DownloadError, match=r"arrived corrupt \(sha256 [0-9a-f]{64} instead of") as err:
        clip(hub, tmp_path)
    assert f"nothing was saved at {tmp_path / 'model.safetensors'}" in str(err.value)
    assert not (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.part").exists()


def test_small_files_are_checked_against_their_git_blob_id(hub, tmp_path):
    add_clip(hub)
    hub.corrupt.add("vocab.json")
    with pytest.raises(download.DownloadError, match="vocab.json arrived corrupt \\(git-sha1 "):
        clip(hub, tmp_path)
    assert not (tmp_path / "vocab.json").exists()


def test_git_blob_id_matches_git_itself(tmp_path):
    data = b'{"bos_token": "<|startoftext|>"}\n'
    (tmp_path / "f.json").write_bytes(data)
    git = subprocess.run(["git", "hash-object", str(tmp_path / "f.json")], capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("git is not available")
    assert download.mismatch(tmp_path / "f.json", len(data), ("git-sha1", git.stdout.strip())) is None
    assert download.mismatch(tmp_path / "f.json", len(data), ("git-sha1", "0" * 40)) is not None


@pytest.mark.parametrize("token, code", [(None, 401), ("hf_wrong", 403)])
def test_gated_repo_without_access_says_accept_the_licence(hub, tmp_path, token, code):
    add_sd(hub)
    hub.gated[SD_REPO] = "hf_right"
    args = ["stable-diffusion-v1-4", "--dir", tmp_path, "--endpoint", hub.url] + (["--token", token] if token else [])
    result = run_script(*args)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert f"was refused ({code}): accept the licence at {hub.url}/{SD_REPO} while logged in" in message
    assert "--token or HF_TOKEN" in message


def test_defaults_with_token_go_to_the_hub_as_bearer_and_never_to_the_cdn(hub, tmp_path):
    add_clip(hub)
    files = add_sd(hub)
    hub.gated[SD_REPO] = "hf_right"
    result = run_script("--dir", tmp_path, "--endpoint", hub.url, env_extra={"HF_TOKEN": "hf_right"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "clip-vit-base-patch32/model.safetensors").exists()
    for path, data in files.items():
        assert (tmp_path / "stable-diffusion-v1-4" / path).read_bytes() == data
    hub_auth = [h.get("Authorization") for role, _, path, h in hub.requests if role == "hub" and "/resolve/" in path]
    cdn_auth = [h.get("Authorization") for role, _, _, h in hub.requests if role == "cdn"]
    assert hub_auth and set(hub_auth) == {"Bearer hf_right"}
    assert len(cdn_auth) == 4 and set(cdn_auth) == {None}  # CLIP's weights + SD's three


def test_relative_listing_links_are_followed(hub, tmp_path):
    _, weights = add_clip(hub)
    hub.page_size = 2
    hub.next_link = lambda page, nxt: nxt.split(str(hub.servers[0].server_port), 1)[1]  # /api/...?cursor=2
    clip(hub, tmp_path, token="hf_secret")
    pages = [h.get("Authorization") for _, _, path, h in hub.requests if "cursor=" in path]
    assert len(pages) == 4 and set(pages) == {"Bearer hf_secret"}  # 2 more pages of main, 2 of refs/pr/15
    assert (tmp_path / "model.safetensors").read_bytes() == weights  # the listing was complete


@pytest.mark.parametrize("case, pages", [("another host", 1), ("file", 1), ("itself", 1), ("endless", 3)])
def test_listing_links_off_the_endpoint_looping_or_endless_are_refused(hub, tmp_path, monkeypatch, case, pages):
    """The Link header names any address the server likes: "localhost" is another host name for the
    same fake hub, and a file:// URL would be read from this machine."""
    add_clip(hub)
    (tmp_path / "secret.txt").write_text("s3cret")
    hub.page_size = 1 if case == "endless" else 2  # 5 files
    monkeypatch.setattr(download, "MAX_LISTING_PAGES", 3)
    hub.next_host = "localhost" if case == "another host" else hub.next_host
    if case == "file":
        hub.next_link = lambda page, nxt: (tmp_path / "secret.txt").as_uri()
    if case == "itself":  # today's code loops forever: the fake hub stops after 50 requests
        hub.next_link = lambda page, nxt: page if len(hub.requests) < 50 else None
    problem = {"another host": f"which is not on {hub.url}", "file": f"which is not on {hub.url}",
               "itself": "a page it has listed already", "endless": "past the 3 pages this script reads"}[case]
    with pytest.raises(download.DownloadError, match=rf"names \S+ as the next page of its file listing, {problem}; "
                                                     r"check --endpoint") as err:
        clip(hub, tmp_path / "out", token="hf_secret")
    assert "s3cret" not in str(err.value)
    assert len(hub.requests) == pages and hub.resolves() == []


@pytest.mark.parametrize("edit", [lambda e: e.pop("size"), lambda e: e.pop("oid"), lambda e: e.update(size="12"),
                                  lambda e: e.update(oid=7), lambda e: e.update(path=["config.json"]),
                                  lambda e: e.update(lfs="yes"), lambda e: e.update(lfs={"size": 3})],
                         ids=["no size", "no oid", "size a string", "oid an int", "path a list", "lfs a string",
                              "lfs without oid"])
def test_listing_entries_without_size_or_oid_or_of_the_wrong_type(hub, tmp_path, edit):
    add_clip(hub)

    def damage(entries):
        for entry in entries:
            if entry["path"] == "config.json":
                edit(entry)
        return entries

    hub.edit = damage
    with pytest.raises(download.DownloadError, match=r"tree/main\?recursive=true lists \{.*config.json.*\}, which "
                                                     r"lacks a file's path, size or oid \(or has one of the wrong "
                                                     r"type\); check --endpoint"):
        clip(hub, tmp_path)
    assert hub.resolves() == []


@pytest.mark.parametrize("flag, below", [("--dir", ""), ("--dir", "sub"), ("--winoground", ""), ("--coco", "sub")])
def test_a_folder_flag_naming_a_file_is_one_line(hub, tmp_path, flag, below):
    add_clip(hub)
    (tmp_path / "file").write_text("x")
    result = run_script(*(["clip-vit-base-patch32"] if flag == "--dir" else []), flag, tmp_path / "file" / below,
                        "--endpoint", hub.url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {flag} {tmp_path / 'file' / below} cannot be made a folder, as "
                                     f"{tmp_path / 'file'} is a file; choose another place.")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("body", [b"<html><body>Sign in to the network</body></html>", b'{"error": "no"}',
                                  b"\xff\xfe not utf-8"])
def test_listing_that_is_not_json_is_one_line(hub, tmp_path, body):
    add_clip(hub)
    hub.tree_body = body
    result = run_script("clip-vit-base-patch32", "--dir", tmp_path, "--endpoint", hub.url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    url = f"{hub.url}/api/models/{CLIP_REPO}/tree/main?recursive=true"
    assert line.startswith(f"error: {url} answered with something other than the hub's JSON file listing "
                           f"(it begins {body[:60]!r}); check --endpoint")


def test_server_errors_are_retried_then_reported(hub, tmp_path):
    files, _ = add_clip(hub)
    hub.errors["config.json"] = [503, 502]
    clip(hub, tmp_path)
    assert (tmp_path / "config.json").read_bytes() == files["config.json"]
    assert hub.resolves().count(f"/{CLIP_REPO}/resolve/main/config.json") == 3

    hub.errors["config.json"] = [503] * (download.RETRIES + 1)
    with pytest.raises(download.DownloadError, match="answered HTTP 503 Service Unavailable; try again later"):
        clip(hub, tmp_path / "again")


def test_404_names_the_file_and_the_url(hub, tmp_path):
    add_clip(hub)
    hub.missing.add("vocab.json")
    with pytest.raises(download.DownloadError) as err:
        clip(hub, tmp_path)
    url = f"{hub.url}/{CLIP_REPO}/resolve/main/vocab.json"
    assert str(err.value) == f"vocab.json was not found at {url} (404); check the name and --revision."


def test_repo_without_safetensors_says_so_and_fetches_nothing(hub, tmp_path):
    add_clip(hub)
    del hub.files[("model", CLIP_REPO, "refs/pr/15")]
    with pytest.raises(download.DownloadError, match="has no model.safetensors at revision main or "
                                                     "model.safetensors at revision refs/pr/15"):
        clip(hub, tmp_path)
    assert hub.resolves() == []


def test_rerun_skips_verified_files_and_refetches_a_damaged_one(hub, tmp_path):
    add_clip(hub)
    clip(hub, tmp_path)
    first = len(hub.resolves())
    assert first == 6  # 5 files, the LFS one through hub + CDN
    clip(hub, tmp_path)
    assert len(hub.resolves()) == first, "a verified file was downloaded again"
    (tmp_path / "vocab.json").write_bytes(b'{"tampered": 1}')
    clip(hub, tmp_path)
    assert hub.resolves()[first:] == [f"/{CLIP_REPO}/resolve/main/vocab.json"]


def test_not_enough_disk_space_says_how_much_is_needed(hub, tmp_path, monkeypatch):
    _, weights = add_clip(hub)
    (tmp_path / "config.json").write_bytes(hub.files[("model", CLIP_REPO, "main")]["config.json"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(download.DownloadError) as err:
        clip(hub, tmp_path)
    assert str(err.value) == (f"{tmp_path.name}/model.safetensors needs {len(weights) / 1e6:.1f} MB but only "
                              f"0.0 MB is free in {tmp_path}; free some space or choose another folder.")
    assert not (tmp_path / "model.safetensors.part").exists()


def test_fp16_takes_variant_files_from_main_or_else_the_fp16_branch(hub, tmp_path):
    vae, unet, text = ("vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "text_encoder/model.safetensors")
    files = add_sd(hub, fp16_on_main=[vae], fp16_branch=[unet, text])
    download.download_repo(*download.model_plan("stable-diffusion-v1-4", fp16=True), tmp_path, hub.url, backoff=0)
    assert (tmp_path / "vae/diffusion_pytorch_model.fp16.safetensors").read_bytes() == \
        files["vae/diffusion_pytorch_model.fp16.safetensors"]
    for path in (unet, text):
        local = tmp_path / path.replace(".safetensors", ".fp16.safetensors")
        assert local.read_bytes() == hub.files[("model", SD_REPO, "fp16")][path]
    assert not list(tmp_path.rglob("*model.safetensors")), "fp32 weights were fetched"


@pytest.mark.parametrize("name, repo", [("stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                        ("stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base")])
def test_sd_presets_fetch_the_diffusers_files_of_their_repo(hub, tmp_path, name, repo):
    files = {path: (fake_weights(40_000 + i, seed=i) if path.endswith(".safetensors") else b'{"n": %d}' % i)
             for i, path in enumerate(download.SD_FILES)}
    hub.files[("model", repo, "main")] = {**files, "unet/diffusion_pytorch_model.bin": b"pickled" * 50}
    result = run_script(name, "--dir", tmp_path, env_extra={"HF_ENDPOINT": hub.url})
    assert result.returncode == 0, result.stderr
    assert {str(p.relative_to(tmp_path / name)): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()} \
        == files
    assert any(path.startswith(f"/{repo}/resolve/main/unet/") for path in hub.resolves())
    assert not any(path.endswith(".bin") for path in hub.resolves()), "a pickle was downloaded"


def test_laion_preset_fetches_open_clip_safetensors_that_load_clip_reads(hub, tmp_path):
    """laion/CLIP-ViT-B-32-laion2B-s34B-b79K's open_clip_model.safetensors (open_clip's keys), its
    open_clip_config.json (which names the activation) and the Hugging Face tokenizer files; never the .bin."""
    import torch
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save

    from weights.networks import load_clip, load_tokenizer

    model = OpenCLIP(16, CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=16),
                     CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)).eval()
    vocab = {f"t{i}": i for i in range(49406)} | {"<|startoftext|>": 49406, "<|endoftext|>": 49407, "!": 0}
    repo = download.OPEN_CLIP_REPOS["CLIP-ViT-B-32-laion2B-s34B-b79K"]
    files = {"open_clip_model.safetensors": save({k: v.contiguous() for k, v in model.state_dict().items()}),
             "open_clip_config.json": json.dumps({"model_cfg": {"embed_dim": 16, "text_cfg": {"heads": 1}}}).encode(),
             "vocab.json": json.dumps(vocab).encode(), "merges.txt": b"#version: 0.2\nt 0\n",
             "tokenizer_config.json": b'{"pad_token": "!"}', "special_tokens_map.json": b'{"pad_token": "!"}'}
    hub.files[("model", repo, "main")] = {**files, "open_clip_pytorch_model.bin": b"pickled" * 50,
                                          "model.safetensors": fake_weights(1000, seed=2), "config.json": b"{}"}
    result = run_script("CLIP-ViT-B-32-laion2B-s34B-b79K", "--dir", tmp_path, env_extra={"HF_ENDPOINT": hub.url})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    ours = load_clip(folder)
    assert ours.config.text.hidden_act == "gelu" and load_tokenizer(folder).pad_id == 0
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=1e-5)


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_winoground_unzips_images_and_sends_the_token(hub, tmp_path):
    examples = b'{"id": 0, "caption_0": "a dog on a cat", "caption_1": "a cat on a dog"}\n'
    images = {"images/ex_0_img_0.png": b"png0", "images/ex_0_img_1.png": b"png1"}
    hub.files[("dataset", "facebook/winoground", "main")] = {
        "data/examples.jsonl": examples, "data/images.zip": zip_bytes(images)}
    hub.gated["facebook/winoground"] = "hf_right"
    result = run_script("--winoground", tmp_path / "wg", "--endpoint", hub.url, "--token", "hf_right")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "wg/examples.jsonl").read_bytes() == examples
    assert {p.name: p.read_bytes() for p in (tmp_path / "wg/images").iterdir()} == \
        {"ex_0_img_0.png": b"png0", "ex_0_img_1.png": b"png1"}
    assert sorted(p.name for p in (tmp_path / "wg").iterdir()) == ["examples.jsonl", "images"]
    assert all(path.startswith("/datasets/facebook/winoground/resolve/main/data/") or "/blobs/" in path
               for path in hub.resolves())
    assert not (tmp_path / "stable-diffusion-v1-4").exists(), "models were fetched though only a dataset was asked for"


def test_coco_fetches_unzips_and_checks_md5(hub, tmp_path):
    train = zip_bytes({"train2017/000000000009.jpg": b"jpeg9", "train2017/000000000025.jpg": b"jpeg25"})
    captions = {"annotations/captions_train2017.json": b'{"annotations": []}',
                "annotations/captions_val2017.json": b"{}", "annotations/instances_train2017.json": b"{}"}
    annotations = zip_bytes(captions)
    hub.static = {"/zips/train2017.zip": train, "/annotations/annotations_trainval2017.zip": annotations}
    md5 = {"zips/train2017.zip": hashlib.md5(train).hexdigest(),
           "annotations/annotations_trainval2017.zip": hashlib.md5(annotations).hexdigest()}
    download.download_coco(tmp_path, hub.url, md5=md5, backoff=0)
    assert sorted(p.name for p in (tmp_path / "train2017").iterdir()) == ["000000000009.jpg", "000000000025.jpg"]
    assert (tmp_path / "annotations/captions_train2017.json").read_bytes() == b'{"annotations": []}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations", "train2017"]  # zips deleted

    wrong = dict(md5, **{"zips/train2017.zip": "0" * 32})
    with pytest.raises(download.DownloadError, match="train2017.zip arrived corrupt \\(md5 "):
        download.download_coco(tmp_path / "again", hub.url, md5=wrong, backoff=0)
    assert not (tmp_path / "again/train2017").exists()
    assert not (tmp_path / "again/train2017.zip").exists()

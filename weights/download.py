"""Fetch the official checkpoints and datasets this project uses, with one command.

    python weights/download.py                          # CLIP ViT-B/32 + Stable Diffusion v1-4 (fp32)
    python weights/download.py --fp16                   # the same, Stable Diffusion in half precision
    python weights/download.py clip-vit-large-patch14   # another CLIP (names: see --help)
    python weights/download.py stable-diffusion-2-1-base CLIP-ViT-B-32-laion2B-s34B-b79K   # SD 2.1-base, a LAION CLIP
    python weights/download.py --coco weights/coco      # MS-COCO 2017 train images + captions
    python weights/download.py --winoground weights/winoground --token hf_...   # gated dataset

Models land in weights/<name>/ in the Hugging Face layout that weights/networks.py loads into
clip.py, unet.py and vae.py (weights/README.md says which script needs which file). Only
`.safetensors` weights are fetched, never `.bin` or `.ckpt`: those are Python pickles, and
unpickling a file runs whatever code it carries, whereas a safetensors file is a JSON header plus
raw tensor bytes.

How: the hub's tree API (`{endpoint}/api/models/{repo}/tree/{revision}?recursive=true`) lists
every file with its size and checksum: the sha256 for LFS files (`lfs.oid`), the git blob sha1
for small ones (`oid`). Each file streams from `{endpoint}/{repo}/resolve/{revision}/{path}`
into `<name>.part` (resumed with an HTTP Range request after an interruption), is verified, and
only then is renamed to its final name. Standard library + tqdm only.
"""

import argparse
import errno
import hashlib
import http.client
import json
import os
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_COCO_ENDPOINT = "http://images.cocodataset.org"
CHUNK_BYTES = 1 << 20
VERIFY_PROGRESS_BYTES = 100_000_000  # show a progress bar when hashing files larger than this
TIMEOUT_S = 60
RETRIES = 5  # further attempts after a timeout, a dropped connection or a 5xx
BACKOFF_S = 2.0  # wait BACKOFF_S · 2^attempt seconds before the next attempt
USER_AGENT = "sds-clip-download/1.0"
# the hub lists 1000 files a page; the repositories here hold fewer than 100
MAX_LISTING_PAGES = 100

CLIP_NAMES = ("clip-vit-base-patch32", "clip-vit-base-patch16", "clip-vit-large-patch14",
              "clip-vit-large-patch14-336")
SD_NAME = "stable-diffusion-v1-4"
# Stable Diffusion presets (diffusers layout, SD_FILES): name → hub repository. Each repository's
# files were checked against public listings (weights/README.md says how).
SD_REPOS = {SD_NAME: "CompVis/stable-diffusion-v1-4",
            "stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "stable-diffusion-2-1-base": "stabilityai/stable-diffusion-2-1-base"}
# CLIPs in open_clip's layout: load_clip reads open_clip_model.safetensors, and the activation
# from open_clip_config.json; the tokenizer files are the Hugging Face ones beside it.
OPEN_CLIP_REPOS = {"CLIP-ViT-B-32-laion2B-s34B-b79K": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"}
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_config.json", "vocab.json",
                   "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
MODEL_NAMES = CLIP_NAMES + tuple(OPEN_CLIP_REPOS) + tuple(SD_REPOS)
DEFAULT_MODELS = ("clip-vit-base-patch32", SD_NAME)
CLIP_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt",
              "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")
SD_FILES = ("model_index.json", "scheduler/scheduler_config.json",
            "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json")
# Fetched when the repo has them; every other file above is required.
OPTIONAL_FILES = ("model_index.json", "tokenizer_config.json", "special_tokens_map.json",
                  "preprocessor_config.json")
# openai/clip-vit-base-patch32 has only pytorch_model.bin on main; its model.safetensors lives in
# the hub's safetensors-conversion pull request, the revision Hugging Face's candle examples load.
SAFETENSORS_PR = {"clip-vit-base-patch32": "refs/pr/15"}
WINOGROUND_REPO = "facebook/winoground"  # gated: accept its terms on the dataset page first
# COCO publishes no checksums; these md5s are the ones PaddleDetection, LVIS and others check.
COCO_MD5 = {"zips/train2017.zip": "cced6f7f71b7629ddf16f17bbcfab6b2",
            "annotations/annotations_trainval2017.zip": "f4bbac642086de4f52a3fdda2de5fa2c"}
COCO_CAPTIONS = ("annotations/captions_train2017.json", "annotations/captions_val2017.json")


class DownloadError(Exception):
    """A failure the user can act on; the message is one sentence that says what to do."""


class _NoTokenOffSite(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never forward the hub token to another host: the hub sends LFS
    files from a CDN through a signed URL, and the token is nobody else's business."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and (urllib.parse.urlsplit(newurl).netloc
                                != urllib.parse.urlsplit(req.full_url).netloc):
            new.remove_header("Authorization")
        return new


def open_url(url, token=None, offset=0):
    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if offset:
        headers["Range"] = f"bytes={offset}-"
    opener = urllib.request.build_opener(_NoTokenOffSite)  # built per call: honours proxy env vars
    return opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def with_retries(action, url, backoff):
    """Run action(), retrying transient failures (timeouts, resets, 5xx, 429) with backoff."""
    for attempt in range(RETRIES + 1):
        try:
            return action()
        except urllib.error.HTTPError as err:
            if (err.code < 500 and err.code != 429) or attempt == RETRIES:
                raise
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError,
                http.client.HTTPException) as err:
            if attempt == RETRIES:
                raise DownloadError(f"{url} kept failing after {RETRIES + 1} attempts ({err}); "
                                    f"check your connection and run the same command again to "
                                    f"resume.") from err
        time.sleep(backoff * 2**attempt)


def explain(err, url, page):
    """Turn an HTTP error into a DownloadError that says what to do."""
    if err.code in (401, 403):
        return DownloadError(f"{url} was refused ({err.code}): accept the licence at {page} while "
                             f"logged in, then pass an access token with --token or HF_TOKEN "
                             f"(https://huggingface.co/settings/tokens).")
    if err.code == 404:
        return DownloadError(f"{urllib.parse.unquote(url.rsplit('/', 1)[-1])} was not found at "
                             f"{url} (404); check the name and --revision.")
    return DownloadError(f"{url} answered HTTP {err.code} {err.reason}; try again later.")


def human(n_bytes):
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def mismatch(path, size, digest):
    """None if path has the published size and digest=(algorithm, hex), else what differs."""
    if size is not None and path.stat().st_size != size:
        return f"{path.stat().st_size} bytes instead of {size}"
    if digest is None:
        return None
    algorithm, expected = digest
    if algorithm == "git-sha1":  # git's blob id: sha1 over a "blob <size>\0" header and the bytes
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        h = hashlib.new(algorithm)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc=f"verify {path.name}",
                                     unit="B", unit_scale=True, leave=False,
                                     disable=path.stat().st_size < VERIFY_PROGRESS_BYTES) as bar:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            bar.update(len(chunk))
    return (None if h.hexdigest() == expected
            else f"{algorithm} {h.hexdigest()} instead of {expected}")


def _stream(url, part, size, token, label):
    """Append the missing bytes of url to part (a Range request when part already holds some)."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have >= size:
        if have == size:
            return  # finished before an interruption; only the rename was missing
        part.unlink()
        have = 0
    try:
        resp = open_url(url, token, offset=have)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: part already holds the whole file
            return
        raise
    with resp:
        if resp.status != 206:  # the server ignored Range (or there was none): start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        if total is not None and total - have > shutil.disk_usage(part.parent).free:
            raise DownloadError(f"{label} needs {human(total - have)} but only "
                                f"{human(shutil.disk_usage(part.parent).free)} is free in "
                                f"{part.parent}; free some space or choose another folder.")
        with open(part, "ab" if have else "wb") as out, tqdm(
                total=total, initial=have, desc=label, unit="B", unit_scale=True,
                unit_divisor=1024) as bar:
            while chunk := resp.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:  # urllib returns b"" at an early EOF
        raise ConnectionResetError(f"connection closed after {part.stat().st_size} "
                                   f"of {total} bytes")


def fetch(url, dest, size=None, digest=None, token=None, page=None, backoff=BACKOFF_S):
    """Download url to dest unless dest is there and verified: resume dest.part, verify, rename."""
    dest = Path(dest)
    label = f"{dest.parent.name}/{dest.name}"
    if dest.exists():
        if mismatch(dest, size, digest) is None:
            print(f"{label}: already there and verified")
            return dest
        print(f"{label}: differs from the published file, fetching it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with_retries(lambda: _stream(url, part, size, token, label), url, backoff)
    except urllib.error.HTTPError as err:
        raise explain(err, url, page or url) from None
    problem = mismatch(part, size, digest)
    if problem:
        part.unlink()
        raise DownloadError(f"{url} arrived corrupt ({problem}), so it was deleted and nothing was "
                            f"saved at {dest}; run the command again to download it afresh.")
    part.replace(dest)
    return dest


def list_files(endpoint, repo, revision, token, kind, backoff):
    """{path: tree entry} of every file of repo at revision; {} if there is no such revision."""
    url = (f"{endpoint}/api/{kind}s/{repo}/tree/{urllib.parse.quote(revision, safe='')}"
           f"?recursive=true")
    files, seen = {}, []
    while url:  # the hub pages long listings through a Link: <...>; rel="next" header
        seen.append(url)
        try:
            entries, link = with_retries(lambda: _read_listing(url, token), url, backoff)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return {}
            raise explain(err, url,
                          f"{endpoint}/{'datasets/' if kind == 'dataset' else ''}{repo}") from None
        files.update({entry["path"]: entry for entry in entries if entry["type"] == "file"})
        url = _next_page(link, seen)
    return files


def _next_page(link, seen):
    """The page a Link header names as rel="next", resolved against the last page read; None if it
    names none. The server may name any address, so only a new page on the first page's scheme and
    host, within MAX_LISTING_PAGES, is followed (the token goes with it); anything else is a
    DownloadError."""
    url = next((part.split(";")[0].strip(" <>") for part in link.split(",")
                if 'rel="next"' in part), None)
    if url is None:
        return None
    url, origin = urllib.parse.urljoin(seen[-1], url), urllib.parse.urlsplit(seen[0])
    if urllib.parse.urlsplit(url)[:2] != origin[:2]:
        problem = f"which is not on {origin.scheme}://{origin.netloc}"
    elif url in seen:
        problem = "a page it has listed already"
    elif len(seen) >= MAX_LISTING_PAGES:
        problem = f"past the {MAX_LISTING_PAGES} pages this script reads"
    else:
        return url
    raise DownloadError(f"{seen[-1]} names {url} as the next page of its file listing, {problem}; "
                        f"check --endpoint (or HF_ENDPOINT) and any proxy in between.")


def _read_listing(url, token):
    """(entries, Link header) of one page of the tree API; a DownloadError if it is not a JSON list
    of entries."""
    with open_url(url, token) as resp:
        body, link = resp.read(), resp.headers.get("Link", "")
    try:
        entries = json.loads(body)
    except ValueError:
        # not JSON, or not UTF-8: a proxy's or captive portal's page, or not a hub at all
        entries = None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"path", "type"} <= e.keys() for e in entries):
        raise DownloadError(f"{url} answered with something other than the hub's JSON file listing "
                            f"(it begins {body[:60]!r}); check --endpoint (or HF_ENDPOINT) and any "
                            f"proxy in between.")
    bad = next((e for e in entries if not _valid_entry(e)), None)
    if bad is not None:
        raise DownloadError(f"{url} lists {json.dumps(bad)[:200]}, which lacks a file's path, size "
                            f"or oid (or has one of the wrong type); check --endpoint (or "
                            f"HF_ENDPOINT) and any proxy in between.")
    return entries, link


def _valid_entry(entry):
    """A listing entry as download_repo reads it: a string path and type; a file also has an
    integer size, a string oid and, if it is in LFS, an lfs object with a string oid."""
    if not isinstance(entry["path"], str) or not isinstance(entry["type"], str):
        return False
    lfs = entry.get("lfs")
    return entry["type"] != "file" or (type(entry.get("size")) is int and entry["size"] >= 0
                                       and isinstance(entry.get("oid"), str)
                                       and (lfs is None or isinstance(lfs, dict)
                                            and isinstance(lfs.get("oid"), str)))


def download_repo(repo, plan, folder, endpoint, token=None, kind="model", backoff=BACKOFF_S):
    """Fetch plan = [(local path, [(revision, path in repo), ...]), ...] into folder; each file
    comes from the first source the hub has. Returns the local paths."""
    page = f"{endpoint}/{'datasets/' if kind == 'dataset' else ''}{repo}"
    listings, jobs = {}, []
    for local, sources in plan:
        for revision, remote in sources:
            if revision not in listings:
                listings[revision] = list_files(endpoint, repo, revision, token, kind, backoff)
            if remote in listings[revision]:
                jobs.append((local, revision, remote, listings[revision][remote]))
                break
        else:
            if Path(local).name not in OPTIONAL_FILES:
                tried = " or ".join(f"{path} at revision {rev}" for rev, path in sources)
                hint = (f"if it only publishes a .bin, pass the ref of its safetensors conversion "
                        f"(see {page}/discussions) with --revision" if kind == "model"
                        else f"see {page}/tree/main")
                raise DownloadError(f"{repo} has no {tried} on {endpoint}; {hint}.")
    paths = []
    for local, revision, remote, entry in jobs:
        url = f"{page}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(remote)}"
        # LFS files are checked against their sha256, small git files against their git blob id.
        digest = ("sha256", entry["lfs"]["oid"]) if entry.get("lfs") else ("git-sha1", entry["oid"])
        paths.append(fetch(url, Path(folder) / local, entry["size"], digest, token, page, backoff))
    return paths


def model_plan(name, fp16=False, revision="main"):
    """(repo id, plan) for one model name; see download_repo for the plan's form."""
    if name in CLIP_NAMES:
        extra = [(SAFETENSORS_PR[name], "model.safetensors")] if name in SAFETENSORS_PR else []
        return f"openai/{name}", [(f, [(revision, f)] + (extra if f == "model.safetensors" else []))
                                  for f in CLIP_FILES]
    if name in OPEN_CLIP_REPOS:
        return OPEN_CLIP_REPOS[name], [(f, [(revision, f)]) for f in OPEN_CLIP_FILES]
    if name not in SD_REPOS:
        raise DownloadError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
    plan = []
    for f in SD_FILES:
        if fp16 and f.endswith(".safetensors"):
            # diffusers' variant files sit beside the fp32 ones; older repos instead keep the
            # fp16 weights, under the plain names, on a branch called "fp16".
            variant = f.replace(".safetensors", ".fp16.safetensors")
            plan.append((variant, [(revision, variant), ("fp16", f)]))
        else:
            plan.append((f, [(revision, f)]))
    return SD_REPOS[name], plan


def unzip(zip_path, dest, inner, members=None):
    """Extract zip_path (its folder `inner`, if it has one) to dest through a temporary folder,
    so an interrupted run leaves no half-filled dest; then delete the zip."""
    tmp = dest.with_name(dest.name + ".unzipping")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        for name in tqdm(members or archive.namelist(), desc=f"unzip {zip_path.name}", unit="file"):
            archive.extract(name, tmp)
    src = tmp / inner if (tmp / inner).is_dir() else tmp
    if dest.exists():
        for child in src.iterdir():
            child.replace(dest / child.name)
    else:
        src.rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink()


def download_winoground(folder, endpoint=DEFAULT_ENDPOINT, token=None, backoff=BACKOFF_S):
    """folder/examples.jsonl and folder/images/ from the gated facebook/winoground dataset."""
    folder = Path(folder)
    plan = [("examples.jsonl", [("main", "data/examples.jsonl")])]
    if not (folder / "images").is_dir():
        plan.append(("images.zip", [("main", "data/images.zip")]))
    download_repo(WINOGROUND_REPO, plan, folder, endpoint, token, "dataset", backoff)
    if not (folder / "images").is_dir():
        unzip(folder / "images.zip", folder / "images", inner="images")


def download_coco(folder, endpoint=DEFAULT_COCO_ENDPOINT, md5=COCO_MD5, backoff=BACKOFF_S):
    """folder/train2017/*.jpg and folder/annotations/captions_{train,val}2017.json
    (MS-COCO 2017)."""
    folder = Path(folder)
    images, annotations = "zips/train2017.zip", "annotations/annotations_trainval2017.zip"
    if not (folder / "train2017").is_dir():
        zip_path = fetch(f"{endpoint}/{images}", folder / "train2017.zip",
                         digest=("md5", md5[images]), backoff=backoff)
        unzip(zip_path, folder / "train2017", inner="train2017")
    if not (folder / COCO_CAPTIONS[0]).exists():
        zip_path = fetch(f"{endpoint}/{annotations}", folder / "annotations_trainval2017.zip",
                         digest=("md5", md5[annotations]), backoff=backoff)
        unzip(zip_path, folder / "annotations", inner="annotations", members=COCO_CAPTIONS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"any of {', '.join(MODEL_NAMES)} (default: {' and '.join(DEFAULT_MODELS)}, "
                             f"unless only --coco/--winoground is given)")
    parser.add_argument("--fp16", action="store_true",
                        help="Stable Diffusion's *.fp16.safetensors instead of fp32")
    parser.add_argument("--revision", default="main", help="hub branch, tag or commit of the models")
    parser.add_argument("--dir", type=Path, default=WEIGHTS_DIR, help="where the model folders go")
    parser.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT),
                        help="hub address (env HF_ENDPOINT)")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"),
                        help="Hugging Face access token, for gated repos (env HF_TOKEN)")
    parser.add_argument("--coco", type=Path, metavar="DIR",
                        help="fetch MS-COCO 2017 train images + captions into DIR")
    parser.add_argument("--coco-endpoint", default=os.environ.get("COCO_ENDPOINT", DEFAULT_COCO_ENDPOINT),
                        help="COCO download address (env COCO_ENDPOINT)")
    parser.add_argument("--winoground", type=Path, metavar="DIR",
                        help="fetch the gated Winoground dataset into DIR")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODEL_NAMES)}")
    for flag, folder in [("--dir", args.dir), ("--coco", args.coco), ("--winoground", args.winoground)]:
        blocker = next((p for p in [folder, *folder.parents] if p.exists()), None) if folder else None
        if blocker is not None and not blocker.is_dir():
            sys.exit(f"error: {flag} {folder} cannot be made a folder, as {blocker} is a file; "
                     f"choose another place.")
    models = args.models or ([] if args.coco or args.winoground else list(DEFAULT_MODELS))
    endpoint = args.endpoint.rstrip("/")
    try:
        for name in models:
            repo, plan = model_plan(name, args.fp16, args.revision)
            download_repo(repo, plan, args.dir / name, endpoint, args.token)
            print(f"{name}: ready in {args.dir / name}")
        if args.winoground:
            download_winoground(args.winoground, endpoint, args.token)
            print(f"winoground: ready in {args.winoground}")
        if args.coco:
            download_coco(args.coco, args.coco_endpoint.rstrip("/"))
            print(f"coco: ready in {args.coco}")
    except DownloadError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to resume where it stopped.")
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        sys.exit(f"error: the disk filled up while writing {err.filename or 'a file'}; free some "
                 f"space and run the same command again to resume.")


if __name__ == "__main__":
    main()

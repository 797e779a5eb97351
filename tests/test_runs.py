"""What train.py and eval_winoground.py write (weights/runs.py, and weights/networks.py's save_*),
tested where it can go wrong: on a full disk, and through a link.

A full disk is simulated by files that take half of a write and then fail with ENOSPC, or made
real with RLIMIT_FSIZE in a fresh Python: a write past the limit stops part-way, as ENOSPC stops
it, and fails with EFBIG. What is proven: every file (a CLIP, a UNet, a VAE, the export, a
checkpoint, the results file and its fallback copy) is then the old one whole or absent, never
cut short, and no temporary file is left behind; a log.jsonl append that fails leaves whole lines
only; a name we write that is a link (a stale *.tmp, the file itself) is replaced, and the file it
points to is left as it was.
"""

import builtins
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sds import Mapper
from weights import runs
from weights.networks import load_clip, load_unet, load_vae, save_clip, save_unet, save_vae

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "weights" / "toy-models"  # small real models: a CLIP, SD's UNet and VAE
# The child's prelude: SIGXFSZ ignored (a write past the limit then fails with EFBIG rather than
# killing it), and `limited(n, write)`, which runs write() with files capped at n bytes and says how
# it ended.
PRELUDE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
SOFT, HARD = resource.getrlimit(resource.RLIMIT_FSIZE)

def limited(limit, write):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, HARD))
    try:
        write()
        print("written")
    except BaseException as err:
        print(type(err).__name__, err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (SOFT, HARD))
"""


def on_a_full_disk(code: str, tmp_path: Path) -> str:
    """Run `code` (PRELUDE's `limited` at hand) in a fresh Python; its stdout."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmpdir"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "tmpdir").mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class FullDisk:
    """A file opened for writing that takes half of each write, then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_the_disk(monkeypatch) -> None:
    """Every file Python opens for writing from now on fails half-way (safetensors' own writes, in
    Rust, are not reached: the rlimit tests below cover what may be written there)."""
    real_open = io.open

    def opened(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return f if set(mode) <= set("rbt") else FullDisk(f)

    monkeypatch.setattr(io, "open", opened)
    monkeypatch.setattr(builtins, "open", opened)


@pytest.mark.parametrize("writer", ["save_clip", "save_unet", "save_vae", "export"])
def test_a_full_disk_leaves_the_old_model_files_whole(tmp_path, monkeypatch, writer):
    """A second save, of other weights, on a disk that fills up: every file of the first save is
    still there, byte for byte, and nothing else is."""
    out, mapper = tmp_path / "out", Mapper(8, (4, 8, 8))

    def export(model, folder):  # the CLIP, h_w and the tokenizer files
        runs.export(SimpleNamespace(clip=model, mapper=mapper),
                    SimpleNamespace(out=folder, clip=TOY / "clip"))

    load, save, part = {"save_clip": (load_clip, save_clip, "clip"),
                        "export": (load_clip, export, "clip"),
                        "save_unet": (load_unet, save_unet, "sd/unet"),
                        "save_vae": (load_vae, save_vae, "sd/vae")}[writer]
    model = load(TOY / part)
    save(model, out)
    before = contents(out)
    with torch.no_grad():  # other weights, the same sizes
        for p in [*model.parameters(), *mapper.parameters()]:
            p.add_(1)
    with monkeypatch.context() as m:
        fill_the_disk(m)
        with pytest.raises(OSError, match="No space left on device"):
            save(model, out)
    assert contents(out) == before


def test_a_full_disk_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    runs.write_checkpoint(path, {"param.w": torch.zeros(1000)}, {"step": 1})
    before = path.read_bytes()
    for failing in ("fsync", "replace"):  # the write, or the rename, fails
        with monkeypatch.context() as m:
            m.setattr(os, failing, enospc)
            with pytest.raises(OSError, match="No space left"):
                runs.write_checkpoint(path, {"param.w": torch.ones(1000)}, {"step": 2})
        assert contents(tmp_path) == {path.name: before}, failing


def test_a_failed_checkpoint_save_in_a_run_is_one_line_naming_the_kept_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    objective = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(objective.parameters())
    args = SimpleNamespace(out=str(tmp_path), grad_accum=1)
    run = SimpleNamespace(rank=0, step=3, steps_per_epoch=2, args=args, sources={},
                          objective=objective, optimizer=optimizer, saved_step=None)
    runs.save_checkpoint(run)
    before, run.step = path.read_bytes(), 5
    monkeypatch.setattr(os, "replace", enospc)
    with pytest.raises(SystemExit) as stopped:
        runs.save_checkpoint(run)
    assert str(stopped.value) == (f"train.py: {path} cannot be written ([Errno 28] No space "
                                  f"left on device); free some space and continue from step "
                                  f"3's checkpoint, kept there, with --resume")
    assert contents(tmp_path) == {path.name: before} and run.saved_step == 3


def test_a_log_append_on_a_full_disk_leaves_whole_lines(tmp_path):
    """An append cannot be atomic; the part of a line that a full disk let through is cut off
    again, so that the log stays whole lines (and the next append starts a line)."""
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    before = log.read_bytes()
    code = f"""
from types import SimpleNamespace
from weights import runs
run = SimpleNamespace(args=SimpleNamespace(out={str(tmp_path)!r}))
record = {{"step": 2, "loss": 1.5, "note": "x" * 100}}
limited({len(before) + 10}, lambda: runs.append_log(run, record))
"""
    outcome = on_a_full_disk(code, tmp_path)
    assert log.read_bytes() == before
    assert outcome.startswith("SystemExit") and f"{log} cannot be appended to" in outcome


def test_results_on_a_full_disk_leave_the_old_file_and_no_partial_copy(tmp_path):
    """eval_winoground's results: --out cannot take them, nor can the fallback copy in the temporary
    folder; the old --out file is whole, no cut-off copy is left, and one line says so."""
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"old": 1}))
    code = f"""
from weights import runs
limited(100, lambda: runs.write_results({{"scores": list(range(200))}}, {str(out)!r}))
"""
    outcome = on_a_full_disk(code, tmp_path)
    assert out.read_text() == json.dumps({"old": 1})
    assert list((tmp_path / "tmpdir").iterdir()) == []
    assert outcome.startswith("SystemExit error: --out") and "the results are lost" in outcome
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "tmpdir"]


def test_writes_replace_links_and_never_write_through_them(tmp_path):
    """A stale checkpoint.safetensors.tmp that links to a file elsewhere, and an export whose
    files are links to other files: the files linked to are left as they were."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not ours")
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.safetensors.tmp").symlink_to(elsewhere)
    runs.write_checkpoint(out / "checkpoint.safetensors", {"param.w": torch.ones(3)}, {"step": 1})
    assert elsewhere.read_bytes() == b"not ours"
    assert not (out / "checkpoint.safetensors.tmp").is_symlink()
    assert load_file(out / "checkpoint.safetensors")["param.w"].tolist() == [1, 1, 1]

    source = tmp_path / "source"  # a CLIP folder whose files --out links to
    save_clip(load_clip(TOY / "clip"), source)
    originals = contents(source)
    for name in ("model.safetensors", "config.json"):
        (out / name).symlink_to(source / name)
    (out / "vocab.json").symlink_to(elsewhere)
    (out / "mapper.safetensors.tmp").symlink_to(elsewhere)
    clip = load_clip(TOY / "clip")
    with torch.no_grad():
        clip.logit_scale.add_(1)
    runs.export(SimpleNamespace(clip=clip, mapper=Mapper(8, (4, 8, 8))),
                SimpleNamespace(out=out, clip=TOY / "clip"))
    assert contents(source) == originals and elsewhere.read_bytes() == b"not ours"
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "vocab.json").read_bytes() == (TOY / "clip" / "vocab.json").read_bytes()
    assert load_clip(out).logit_scale.item() == pytest.approx(clip.logit_scale.item())


def test_log_append_never_follows_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("")
    (tmp_path / "log.jsonl").symlink_to(elsewhere)
    with pytest.raises(OSError):
        runs.append_log(SimpleNamespace(args=SimpleNamespace(out=str(tmp_path))), {"step": 1})
    assert elsewhere.read_text() == ""


def test_unet_and_vae_saves_never_write_through_links(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not ours")
    for save, load, part in ((save_unet, load_unet, "unet"), (save_vae, load_vae, "vae")):
        out = tmp_path / part
        out.mkdir()
        (out / "config.json").symlink_to(elsewhere)
        (out / "diffusion_pytorch_model.safetensors.tmp").symlink_to(elsewhere)
        save(load(TOY / "sd" / part), out)
        assert elsewhere.read_bytes() == b"not ours"
        load(out)

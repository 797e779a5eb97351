"""What a training or scoring run writes and reads back: train.py's checkpoints (the trained
weights, AdamW's state, what a resume checks), its log.jsonl, the fine-tuned CLIP's export, the
sources' fingerprints; eval_winoground.py's results file. Every file is written atomically."""

import argparse
import errno
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from clip import image_transform
from weights.coco import CAPTIONS_FILE, CocoCaptions
from weights.networks import OPEN_CLIP_WEIGHTS, check_scheduler, hub_path, load_clip, load_tokenizer
from weights.networks import load_unet, save_clip, write_atomically
from weights.winoground import Winoground

CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "log.jsonl"
# Small files that make the exported folder a complete Hugging Face CLIP checkpoint.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "preprocessor_config.json")
# A model folder's weights: the first of these it holds, in the order load_clip and load_unet try.
WEIGHTS_FILES = ("model.safetensors", "model.fp16.safetensors",
                 "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 *OPEN_CLIP_WEIGHTS)
# Settings a resume may change: where things are (`fingerprint` checks their content instead), how
# often to save, log and evaluate; and, logged, how the update is scheduled and clipped (the cure
# for a diverging run). Every other setting defines the run and must match the checkpoint's.
RESUMABLE_CHANGES = {"clip", "sd", "coco_root", "out", "resume", "max_steps", "save_every",
                     "log_every", "device", "num_workers", "skip_bad_images",
                     "gradient_checkpointing", "winoground", "toy"}
LOGGED_CHANGES = {"lr", "warmup_steps", "cosine", "epochs", "grad_clip", "weight_decay"}
TOY_MODELS = Path(__file__).resolve().parent / "toy-models"  # the toy world's, shipped in git


# ------------------------------------------------------------------------ checkpoints and resume


def trained_state(objective: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the trained parameters, "param.<name>", a fitted and frozen h_w,
    "fitted.<name>", and AdamW's state per parameter, "adamw.<name>.step", ".exp_avg" (m) and
    ".exp_avg_sq" (v)."""
    names = {p: name for name, p in objective.named_parameters()}
    state = {f"param.{name}": p.detach() for name, p in objective.named_parameters()
             if p.requires_grad}
    state |= {f"fitted.{name}": p.detach() for name, p in fitted_mapper(objective).items()}
    for p, moments in optimizer.state.items():
        state.update({f"adamw.{names[p]}.{key}": value.detach() for key, value in moments.items()})
    return state


def fitted_mapper(objective: nn.Module) -> dict[str, nn.Parameter]:
    """h_w's parameters when it was fitted and frozen (--mapper fitted), else none."""
    return {name: p for name, p in objective.named_parameters(remove_duplicate=False)
            if name.startswith("mapper.") and not p.requires_grad}


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of `state` whose tensor holds a NaN or an infinity (one device sync for all)."""
    keys = [key for key in state if not key.endswith(".step")]  # AdamW's step counts: on the CPU
    finite = torch.stack([torch.isfinite(state[k]).all() for k in keys]).tolist() if keys else []
    return [key for key, ok in zip(keys, finite) if not ok]


def save_checkpoint(run) -> None:
    """The current weights and AdamW state as the last good ones (the master process writes them),
    with what a resume checks: the step, the settings and the sources ("identity")."""
    if run.rank == 0:
        meta = {"step": run.step, "batches_per_epoch": run.steps_per_epoch * run.args.grad_accum,
                "settings": vars(run.args), "identity": run.sources}
        path = Path(run.args.out) / CHECKPOINT_FILE
        try:
            write_checkpoint(path, trained_state(run.objective, run.optimizer), meta)
        except OSError as err:  # a full disk, say: write_checkpoint left the last one whole
            then = ("start again" if run.saved_step is None else f"continue from step "
                    f"{run.saved_step}'s checkpoint, kept there, with --resume")
            raise SystemExit(f"train.py: {path} cannot be written ({err}); free some space and "
                             f"{then}") from None
    run.saved_step = run.step


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """One safetensors file of finite tensors, with `meta` as JSON metadata; written atomically."""
    if bad := nonfinite(state):
        raise ValueError(f"{path}: a checkpoint holds finite tensors only; these are not: "
                         f"{', '.join(bad[:3])}")
    tensors = {key: value.cpu().contiguous() for key, value in state.items()}
    write_atomically(path, save(tensors, metadata={"sds_clip": json.dumps(meta)}))


def read_checkpoint(path: Path, resume: bool) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """With --resume, the checkpoint's metadata and tensors, or one line saying that it cannot be
    resumed; without, None and {}, and there must be no checkpoint to overwrite."""
    if path.exists() and not resume:
        raise SystemExit(f"train.py: {path} exists — pass --resume to continue it, or choose "
                         f"another --out")
    if not resume:
        return None, {}
    if not path.is_file():
        raise SystemExit(f"train.py: --resume: {path} not found")
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})["sds_clip"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        # A KeyError or TypeError says the metadata is not ours, or was edited by hand.
        kinds = {"step": int, "batches_per_epoch": int, "settings": dict, "identity": dict}
        wrong = [key for key, kind in kinds.items()
                 if not isinstance(meta[key], kind) or isinstance(meta[key], bool)]
        if wrong or not all(isinstance(entry, dict) for entry in meta["identity"].values()):
            raise TypeError(f"metadata {wrong or ['identity']} of the wrong type")
        if bad := nonfinite(tensors):  # train.py saves finite tensors only
            raise ValueError(f"NaN or infinite values in {', '.join(bad[:3])}")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"train.py: {path} is not a checkpoint this train.py can resume "
                         f"({type(err).__name__}: {err}): it may be damaged, or written by another "
                         f"program or an older train.py; move it away to start afresh there, or "
                         f"pass another --out") from None
    return meta, tensors


def fingerprint(clip: Path, sd: Path, coco_root: Path, vae: bool = False) -> dict:
    """What a run trains from, by content: the sha256 of the CLIP's, the UNet's and SD's text
    encoder's weights files (and the VAE's, which fits h_w with --mapper fitted) and of the captions
    file (as the Hugging Face hub's LFS ids; ≈ 0.7 GB/s on one core: some 7 s for ViT-B/32 + SD 1.x,
    4.6 GB, at each start)."""
    folders = {"clip": clip, "unet": sd / "unet", "text_encoder": sd / "text_encoder"}
    folders |= {"vae": sd / "vae"} if vae else {}
    files = {key: next(folder / name for name in WEIGHTS_FILES if (folder / name).is_file())
             for key, folder in folders.items()} | {"captions": coco_root / CAPTIONS_FILE}
    sources = {}
    for key, file in files.items():
        with open(file, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        sources[key] = {"file": str(file), "sha256": digest}
    return sources


def check_resume(path: Path, meta: dict, args: argparse.Namespace, sources: dict) -> dict:
    """Refuse, in one line, a resume that would not continue the checkpoint's run: other weights,
    other captions, other settings. Returns the LOGGED_CHANGES it makes, {name: [old, new]}."""
    for key, now in sources.items():
        then = meta["identity"].get(key, {})
        if then.get("sha256") != now["sha256"]:
            raise SystemExit(f"train.py: {path} was trained from {then.get('file')} (sha256 "
                             f"{str(then.get('sha256'))[:12]}…), not from {now['file']} (sha256 "
                             f"{now['sha256'][:12]}…): resume with the same {key} file, or start "
                             f"afresh with another --out")
    # --precision defines a run (it changes every loss and gradient) and is never forced by the
    # device: both run anywhere. A checkpoint from before --precision ran in its device's default.
    settings = meta["settings"]
    defaults = {"trainable": "layernorm", "mapper": "joint", "mapper_images": 3000}  # older ones
    saved = {"precision": default_precision(settings.get("device", "cpu"))} | defaults | settings
    changed = {name: [saved.get(name), value] for name, value in vars(args).items()
               if name not in RESUMABLE_CHANGES and saved.get(name) != value}
    fixed = [f"--{name} {old!r} → {new!r}" for name, (old, new) in changed.items()
             if name not in LOGGED_CHANGES]
    if fixed:
        raise SystemExit(f"train.py: {path} was written with other settings ({'; '.join(fixed)}); "
                         f"resume with the same ones or start afresh with another --out")
    return changed


def restore(path: Path, meta: dict, tensors: dict, objective: nn.Module, optimizer,
            batches_per_epoch: int) -> int:
    """Put a checkpoint's trained parameters and AdamW state in place, once they fit this run;
    returns its step."""
    if meta["batches_per_epoch"] != batches_per_epoch:
        raise SystemExit(f"train.py: {path} was written with {meta['batches_per_epoch']} batches "
                         f"per epoch, this dataset makes {batches_per_epoch}: the data order "
                         f"cannot be resumed")
    params = {name: p for name, p in objective.named_parameters() if p.requires_grad}
    saved = {key[len("param."):] for key in tensors if key.startswith("param.")}
    if saved != set(params):
        missing, unexpected = sorted(set(params) - saved)[:10], sorted(saved - set(params))[:10]
        raise SystemExit(f"train.py: {path} holds other trained parameters than this run "
                         f"(missing {missing}, unexpected {unexpected})")
    wrong = [f"{name} {tuple(tensors[f'param.{name}'].shape)} ≠ {tuple(p.shape)}"
             for name, p in params.items() if tensors[f"param.{name}"].shape != p.shape]
    if wrong:
        raise SystemExit(f"train.py: {path} holds parameters of other shapes than this CLIP: "
                         f"{', '.join(wrong[:3])}")
    fitted = fitted_mapper(objective)
    if {f"fitted.{name}" for name in fitted} != {key for key in tensors if key.startswith("fitted.")}:
        raise SystemExit(f"train.py: {path} holds no fitted h_w of this run's shape (--mapper "
                         f"fitted writes one); resume with the checkpoint's --mapper")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
        for name, p in fitted.items():
            if tensors[f"fitted.{name}"].shape != p.shape:
                raise SystemExit(f"train.py: {path} holds a fitted h_w of shape "
                                 f"{tuple(tensors[f'fitted.{name}'].shape)} for {name}, this run's is "
                                 f"{tuple(p.shape)}")
            p.copy_(tensors[f"fitted.{name}"])
    state = optimizer.state_dict()  # its param_groups list parameters by position
    state["state"], wrong = {}, []
    for i, (name, p) in enumerate(params.items()):
        moments = {key: tensors.get(f"adamw.{name}.{key}") for key in ("step", "exp_avg",
                                                                        "exp_avg_sq")}
        if any(value is not None for value in moments.values()):  # none: not updated yet
            shapes = {"step": (), "exp_avg": p.shape, "exp_avg_sq": p.shape}
            wrong += [f"adamw.{name}.{key}" for key, value in moments.items()
                      if value is None or value.shape != shapes[key]]
            state["state"][i] = moments
    if wrong:
        raise SystemExit(f"train.py: {path} holds AdamW moments that are missing or of the "
                         f"wrong shape: {', '.join(wrong[:3])}; move it away to start afresh there, "
                         f"or pass another --out")
    optimizer.load_state_dict(state)
    return meta["step"]


def default_precision(device: str) -> str:
    return "bf16" if str(device).startswith("cuda") else "fp32"


# ------------------------------------------------------------------------ the log and the export


def start_log(out: Path, step: int, changes: dict, resume: bool) -> None:
    """log.jsonl: empty for a new run; on resume, its lines up to the checkpoint's step, rewritten
    atomically, then one line with the settings this resume changes, if any."""
    out.mkdir(parents=True, exist_ok=True)
    file = out / LOG_FILE
    try:
        lines = file.read_text(encoding="utf-8").splitlines() if resume and file.exists() else []
    except UnicodeDecodeError as err:
        raise SystemExit(f"train.py: {file} is not UTF-8 text (byte {err.start}: {err.reason}); "
                         f"fix that line, or move the file away to resume with a new log") from None

    def position(line: str) -> float:  # a resume's "changed" line comes just after its step (a new
        try:  # resume from that step writes its own); a line a killed run left half-written, never
            record = json.loads(line)
            return record["step"] + (0.5 if "changed" in record else 0)
        except (json.JSONDecodeError, KeyError, TypeError):
            return math.inf

    kept = [line for line in lines if position(line) <= step]
    kept += [json.dumps({"step": step, "changed": changes})] if changes else []
    write_atomically(file, "".join(line + "\n" for line in kept).encode())


def log_step(run, progress, losses: list, lr: float, grad_norm: float, embed_grads: list,
             images, seconds: float):
    """The progress bar; a log.jsonl line every --log_every steps and at the end (master only)."""
    if run.rank == 0:
        progress.update(1)
        progress.set_postfix(loss=f"{losses[0]:.4f}", sds=f"{losses[2]:.4f}")
        if (run.args.log_every and run.step % run.args.log_every == 0) or run.step == run.last_step:
            append_log(run, {"step": run.step, "loss": losses[0], "clip_loss": losses[1],
                             "sds_loss": losses[2], "lr": lr, "grad_norm": grad_norm,
                             "clip_grad_norm": embed_grads[0], "sds_grad_norm": embed_grads[1],
                             "images_per_s": images.item() / seconds})


def append_log(run, record: dict) -> None:
    """One line at the end of log.jsonl. An append cannot be atomic: a full disk may take part of
    the line, which is cut off again, so that the log holds whole lines (a killed run may still
    leave half of one: start_log drops it on resume)."""
    file, line = Path(run.args.out) / LOG_FILE, (json.dumps(record) + "\n").encode()
    # never through a link; unbuffered: one write, whose length is counted
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    with open(os.open(file, flags, 0o666), "ab", buffering=0) as f:
        end = f.seek(0, os.SEEK_END)
        try:
            if f.write(line) != len(line):
                raise OSError(errno.ENOSPC, "only part of the line was written")
        except OSError as err:
            f.truncate(end)
            raise SystemExit(f"train.py: {file} cannot be appended to ({err}); free some space "
                             f"and continue with --resume") from None


def save_clip_folder(clip: nn.Module, source: Path, out: Path) -> None:
    """A complete Hugging Face CLIP folder: the weights and config (save_clip) and the tokenizer
    files of the CLIP it was fine-tuned from, each written atomically."""
    save_clip(clip, out)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            write_atomically(out / name, (source / name).read_bytes())


def export(model: nn.Module, args) -> None:
    """The fine-tuned CLIP as a Hugging Face folder (transformers' CLIPModel.from_pretrained and
    our load_clip read it), with the source's tokenizer files, and h_w in mapper.safetensors."""
    out, source = Path(args.out), hub_path(args.clip)
    save_clip_folder(model.clip, source, out)
    mapper = {k: v.detach().cpu().contiguous() for k, v in model.mapper.state_dict().items()}
    metadata = {"latent_shape": json.dumps(model.mapper.latent_shape)}
    write_atomically(out / "mapper.safetensors", save(mapper, metadata=metadata))


def gradient_summary(log_file: Path) -> str:
    """What each loss term sent to CLIP's image embedding, averaged over the logged steps."""
    records = [r for r in map(json.loads, log_file.read_text().splitlines()) if "sds_grad_norm" in r]
    if not records:
        return "gradient on f_φ(x): no steps logged"
    clip_norm = sum(r["clip_grad_norm"] for r in records) / len(records)
    sds_norm = sum(r["sds_grad_norm"] for r in records) / len(records)
    ratio = f"{sds_norm / clip_norm:.3g}" if clip_norm > 0 else "n/a (no gradient reaches f_φ(x))"
    return (f"gradient on f_φ(x), mean over {len(records)} logged steps: L_CLIP {clip_norm:.3g}, "
            f"λ·L_SDS {sds_norm:.3g}; ratio λ·L_SDS / L_CLIP {ratio}")


# ----------------------------------------------------------------------------- sources and results


def read_sources(args: argparse.Namespace, read_winoground_images: bool = False) -> tuple:
    """What a training run reads, or one line naming what is wrong: ((clip path, SD folder),
    (the CLIP to fine-tune, its tokenizer), (SD's frozen UNet, text encoder, tokenizer), (COCO,
    --winoground or None)). The CLIP is float32 (its LayerNorms are trained); SD's UNet and text
    encoder bf16 under --precision bf16 (half the memory, and autocast need not cast them each
    step). `read_winoground_images`: a resume scores Winoground first at an epoch's end, so its
    images are read now."""
    device = torch.device(args.device)
    sd_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    try:
        winoground = Winoground(args.winoground, "--winoground") if args.winoground else None
        clip_path, sd = find_weights(args)
        clip, tokenizer = load_clip(clip_path, device), load_tokenizer(clip_path)
        unet = load_unet(sd / "unet", device, sd_dtype).requires_grad_(False)
        sd_text_encoder = load_clip(sd / "text_encoder", device, sd_dtype).requires_grad_(False)
        sd_tokenizer = load_tokenizer(sd / "tokenizer")
        size = clip.config.vision.image_size
        dataset = CocoCaptions(args.coco_root, image_transform(size), args.limit_images, args.seed,
                               size)
        if winoground and read_winoground_images:
            for example in tqdm(winoground.examples, desc="winoground images"):
                winoground.images(example, size)
    except (FileNotFoundError, ValueError, ImportError) as err:  # ImportError: parquet, no pyarrow
        raise SystemExit(f"train.py: {err}") from None
    sd_parts = unet, sd_text_encoder, sd_tokenizer
    return (clip_path, sd), (clip, tokenizer), sd_parts, (dataset, winoground)


def find_weights(args: argparse.Namespace) -> tuple[Path, Path]:
    """--clip and --sd as folders (a hub id: its snapshot in the local HF cache), or one line
    that says what is missing."""
    missing = [Path(p) for p in (args.clip, args.sd)
               if Path(p).parent == Path("weights") and not Path(p).exists()]
    if missing:  # download.py's folders (the defaults), not hub ids
        raise FileNotFoundError(f"{' and '.join(map(str, missing))} not found — run "
                                f"`python weights/download.py {' '.join(p.name for p in missing)}`")
    clip, sd = hub_path(args.clip), hub_path(args.sd)
    parts = ("unet", "text_encoder", "tokenizer") + (("vae",) if args.mapper == "fitted" else ())
    if not clip.is_dir():
        raise FileNotFoundError(f"--clip {clip}: no such folder — pass a CLIP folder or a hub id "
                                f"in the local cache, or run `python weights/download.py`")
    for folder in (sd / part for part in parts):
        if not folder.is_dir():
            raise FileNotFoundError(f"--sd {args.sd}: {folder} not found — pass a Stable "
                                    f"Diffusion folder with {', '.join(parts)}/, or run "
                                    f"`python weights/download.py`")
    check_scheduler(sd)  # an ε-prediction model with SD's noise schedule
    return clip, sd


def can_write(folder: Path) -> bool:
    """Whether files can be made in `folder`, making it first if need be (nothing is made here)."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def out_problem(args: argparse.Namespace) -> str | None:
    """Why train.py cannot write to --out, in one sentence, or None: a file or a read-only folder
    in its way, or a source it would overwrite: --out is --clip, --sd or the shipped toy models,
    or lies inside one (links and relative paths resolved; a hub id as its snapshot in the local
    cache, where it is one)."""
    if not can_write(Path(args.out)):
        return (f"--out {args.out} cannot be written (a file or a read-only folder is in its "
                f"way); pass another --out")
    out = Path(args.out).resolve()
    sources = {"--clip": args.clip, "--sd": args.sd, "the shipped toy models": TOY_MODELS}
    for name, source in sources.items():
        try:
            folder = hub_path(source) if source is not None else None
        except FileNotFoundError:  # a hub id that is not in the cache: read_sources says so
            folder = Path(source)
        if folder is not None and out.is_relative_to(folder.resolve()):
            where = "is" if out == folder.resolve() else "lies inside"
            return (f"--out {args.out} {where} {name} ({folder.resolve()}), whose files the run "
                    f"would write over; pass another --out")
    return None


def write_results(results: dict, out: str) -> None:
    """results.json to --out or, if that fails now that the work is done, to a temporary file: say
    where. Either is whole or absent."""
    data = (json.dumps(results, indent=1) + "\n").encode()
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(out), data)
    except OSError as err:
        handle, kept = tempfile.mkstemp(prefix="winoground-", suffix=".json")  # a name of our own
        os.close(handle)
        try:
            write_atomically(Path(kept), data)
        except OSError as again:
            os.remove(kept)
            sys.exit(f"error: --out {out} cannot be written ({err}), nor {kept} ({again}); the "
                     f"results are lost: free some space and run again")
        sys.exit(f"error: --out {out} cannot be written ({err}); the results are in {kept}")
    print(f"wrote {out}")

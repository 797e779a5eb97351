"""Fine-tune CLIP with SDS-CLIP: contrastive loss + λ · score distillation from a frozen SD UNet.

SDS-CLIP (Basu et al. 2023, https://arxiv.org/abs/2307.09233), as in the paper: only CLIP's
LayerNorms (and the map h_w into the UNet's latent space) are trained, on MS-COCO 2017 train
captions, for 5 epochs at batch 32 with AdamW lr 5e-5 and λ = 0.001:

    loss = L_CLIP(f_φ(x), g_φ(caption)) + λ · L_SDS(ε_θ, h_w(f_φ(x)), c = SD-text-encoder(caption))

Loads the CLIP to fine-tune (`--clip`), Stable Diffusion 1.x's unet/, text_encoder/ and
tokenizer/ (`--sd`) and COCO (`--coco_root`); `python weights/download.py` and
`python weights/download.py --coco weights/coco` fetch them. Writes checkpoints, a JSONL log
and finally the fine-tuned CLIP in Hugging Face layout (+ mapper.safetensors) to `--out`.

    python train.py                                  # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py             # several GPUs: the same run, split
    python train.py --resume                         # continue from --out/checkpoint.safetensors

--sds_mode full (the default, the paper's loss) backpropagates through the UNet: at batch 32
that needs far more GPU memory than stopgrad; --gradient_checkpointing trades time for it.
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from clip import Tokenizer, image_transform, load_clip, save_clip
from sds import Mapper, NoiseSchedule, contrastive_loss, sds_loss
from unet import load_unet

CAPTIONS_FILE = "annotations/captions_train2017.json"
IMAGES_DIR = "train2017"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "log.jsonl"
# Small files that make the exported folder a complete Hugging Face CLIP checkpoint.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json")
# Settings that may differ when resuming: where things are and how often to save; everything
# else defines the run and must match the checkpoint.
RESUMABLE_CHANGES = {"clip", "sd", "coco_root", "out", "resume", "max_steps", "save_every", "log_every", "device",
                     "num_workers", "skip_bad_images", "gradient_checkpointing"}


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="weights/clip-vit-base-patch32", help="CLIP to fine-tune (Hugging Face folder)")
    p.add_argument("--sd", default="weights/stable-diffusion-v1-4", help="Stable Diffusion 1.x folder (diffusers layout)")
    p.add_argument("--coco_root", default="weights/coco", help="MS-COCO 2017 folder: train2017/ and annotations/")
    p.add_argument("--out", default="out/sds-clip", help="checkpoints, log.jsonl and the final model")
    p.add_argument("--epochs", type=int, default=5, help="passes over the images (paper: 5)")
    p.add_argument("--batch_size", type=int, default=32, help="image–caption pairs per contrastive batch, all processes together (paper: 32)")
    p.add_argument("--grad_accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (paper: 5e-5)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (LayerNorm gains are usually not decayed)")
    p.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--cosine", action="store_true", help="cosine decay of the learning rate to 0 at the end of --epochs")
    p.add_argument("--grad_clip", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--sds_weight", type=float, default=0.001, help="λ, the weight of the SDS loss (paper: 0.001)")
    p.add_argument("--sds_mode", choices=("full", "stopgrad"), default="full",
                   help="full: the paper's loss through the UNet; stopgrad: DreamFusion's SDS gradient")
    p.add_argument("--image_layernorms_only", action="store_true", help="train only the image tower's LayerNorms (and h_w)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations in backward (less memory)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    p.add_argument("--limit_images", type=int, default=0, help="use only the first N COCO images (0: all)")
    p.add_argument("--skip_bad_images", action="store_true", help="skip (and count) missing or unreadable images")
    p.add_argument("--save_every", type=int, default=1000, help="write a checkpoint every N steps and at the end (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--log_every", type=int, default=1, help="one log.jsonl line every N steps")
    p.add_argument("--num_workers", type=int, default=4, help="data-loading processes per training process")
    p.add_argument("--seed", type=int, default=0, help="seeds h_w's init, data order, captions, t and ε")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


class CocoCaptions(Dataset):
    """MS-COCO 2017 train: item i is image i (images sorted by id) as CLIP pixels; its captions
    are kept here, and `caption(i, epoch)` draws one of them per image and epoch."""

    def __init__(self, root: str | Path, transform, limit_images: int = 0, seed: int = 0):
        root, self.transform, self.seed = Path(root), transform, seed
        file = root / CAPTIONS_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found — run `python weights/download.py --coco {root}`")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            captions = defaultdict(list)
            for ann in data["annotations"]:
                captions[ann["image_id"]].append(ann["caption"].strip())
            images = sorted((im["id"], im["file_name"]) for im in data["images"] if im["id"] in captions)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{file} is not a COCO captions file ({type(err).__name__}: {err}) — "
                             f"run `python weights/download.py --coco {root}` again") from None
        images = images[:limit_images] if limit_images else images
        if not images:
            raise ValueError(f"{file} lists no captioned images")
        self.files = [root / IMAGES_DIR / name for _, name in images]
        self.captions = [captions[image_id] for image_id, _ in images]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        """(pixels, index, None), or (None, index, why) for a missing or unreadable image."""
        file = self.files[index]
        try:
            with Image.open(file) as image:  # any mode: image_transform converts to RGB
                return self.transform(image), index, None
        except FileNotFoundError:
            return None, index, f"{file} not found"
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for corrupt or truncated files
            return None, index, f"{file} cannot be read as an image ({err})"

    def caption(self, index: int, epoch: int) -> str:
        """One of image `index`'s captions, drawn afresh each epoch; a function of (seed, epoch, index) only."""
        choice = np.random.default_rng((self.seed, epoch, index)).integers(len(self.captions[index]))
        return self.captions[index][choice]


def collate(samples):
    good = [s for s in samples if s[0] is not None]
    pixels = torch.stack([s[0] for s in good]) if good else None  # (B, 3, S, S)
    return pixels, [s[1] for s in good], [s[2] for s in samples if s[0] is None]


def batches(dataset, sampler, local_batch: int, batches_per_epoch: int, start: int, num_workers: int):
    """Yield (epoch, batch) forever, beginning with global batch number `start`.

    The order of an epoch is DistributedSampler's permutation of (seed, epoch); process r of W
    takes positions r, r+W, … of it, so that the W local batches of one step hold the same
    images as one process's batch. Resuming only needs the batch number."""
    epoch, skip = divmod(start, batches_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * local_batch: batches_per_epoch * local_batch]
        loader = DataLoader(dataset, batch_size=local_batch, sampler=order, collate_fn=collate, num_workers=num_workers)
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- several processes


class GatherWithGrad(torch.autograd.Function):
    """All processes' rows, concatenated in rank order; backward hands each process the gradient
    of its own rows summed over every process's loss (processes may hold different row counts).

    Every process computes the same L_CLIP over the gathered batch, so process r receives
    W · ∂L_CLIP/∂(its rows); DistributedDataParallel's average over the W processes then leaves
    exactly the gradient one process would compute on the whole batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rows = torch.tensor([x.shape[0]], device=x.device)
        all_rows = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(all_rows, rows)
        ctx.rows = [int(n) for n in all_rows]
        padded = F.pad(x, (0, 0, 0, max(ctx.rows) - x.shape[0])).contiguous()  # all_gather wants equal shapes
        gathered = [torch.empty_like(padded) for _ in ctx.rows]
        dist.all_gather(gathered, padded)
        return torch.cat([g[:n] for g, n in zip(gathered, ctx.rows)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # Σ over processes of ∂L_r/∂(all rows)
        start = sum(ctx.rows[: dist.get_rank()])
        return grad[start: start + ctx.rows[dist.get_rank()]]


def gather(x: torch.Tensor) -> torch.Tensor:
    return GatherWithGrad.apply(x) if dist.is_initialized() else x


def any_process(flag: bool, device) -> bool:
    """True on every process if `flag` is true on any: lets all processes stop together."""
    if not dist.is_initialized():
        return flag
    flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of t and ε for one batch: a function of (seed, step, micro-batch) alone,
    so that a resumed run and every process of a distributed run draw one process's numbers."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0]))


# ----------------------------------------------------------------------------- model


class SDSCLIP(nn.Module):
    """The trained part: CLIP (only its LayerNorms will have requires_grad) and h_w. The frozen
    UNet is passed to forward, not owned, so that DistributedDataParallel neither broadcasts
    nor watches its 860M parameters."""

    def __init__(self, clip: nn.Module, mapper: Mapper):
        super().__init__()
        self.clip, self.mapper = clip, mapper

    def forward(self, pixels, ids, unet, schedule, context, t, noise, sds_mode):
        image_embeds = self.clip.encode_image(pixels)  # f_φ(x), (B, D)
        text_embeds = self.clip.encode_text(ids)  # g_φ(caption), (B, D)
        l_sds = sds_loss(unet, schedule, self.mapper, image_embeds, context, t=t, noise=noise, mode=sds_mode)
        return image_embeds, text_embeds, l_sds


def freeze_all_but_layernorms(clip: nn.Module, image_only: bool) -> None:
    """requires_grad only for the weight and bias of every nn.LayerNorm (pre_layrnorm, the
    layer_norm1/2 of each block, post_layernorm, final_layer_norm), or of the image tower's only."""
    clip.requires_grad_(False)
    tower = clip.vision_model if image_only else clip
    for module in tower.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)


def learning_rate(step: int, args, total_steps: int) -> float:
    """Linear warm-up over --warmup_steps, then constant, or with --cosine a cosine decay to 0
    at the end of --epochs (--max_steps only stops early, it does not reshape the schedule)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if not args.cosine:
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model: SDSCLIP, optimizer, step: int, batches_per_epoch: int, args) -> None:
    """One safetensors file, replaced atomically: the trained parameters, AdamW's state per
    parameter, the RNG states, and (as JSON metadata) the step, the position in the data order
    and the settings."""
    names = {p: name for name, p in model.named_parameters()}
    tensors = {f"param.{name}": p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    for p, state in optimizer.state.items():  # AdamW: step, exp_avg (m), exp_avg_sq (v)
        tensors.update({f"adamw.{names[p]}.{key}": value.detach().cpu().contiguous() for key, value in state.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    epoch, batch_in_epoch = divmod(step * args.grad_accum, batches_per_epoch)
    meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "batches_per_epoch": batches_per_epoch,
            "settings": vars(args), "numpy_rng": [np_kind, np_pos, np_has_gauss, np_gauss],
            "python_rng": random.getstate()}
    data = save(tensors, metadata={"sds_clip": json.dumps(meta)})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a reader (or a crash) sees the old file or the new one, never half of one


def load_checkpoint(path: Path, model: SDSCLIP, optimizer, batches_per_epoch: int, args) -> int:
    """Restore what save_checkpoint wrote; returns the step to continue from."""
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["sds_clip"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    changed = [f"--{k} {meta['settings'].get(k)!r} → {v!r}" for k, v in vars(args).items()
               if k not in RESUMABLE_CHANGES and meta["settings"].get(k) != v]
    if changed:
        raise SystemExit(f"train.py: {path} was written with other settings ({'; '.join(changed)}); "
                         f"resume with the same ones or start afresh with another --out")
    if meta["batches_per_epoch"] != batches_per_epoch:
        raise SystemExit(f"train.py: {path} was written with {meta['batches_per_epoch']} batches per epoch, this dataset "
                         f"makes {batches_per_epoch}: the captions file changed, so the data order cannot be resumed")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {key[len("param."):] for key in tensors if key.startswith("param.")}
    if saved != set(params):
        raise SystemExit(f"train.py: {path} holds other trained parameters than this run "
                         f"(missing {sorted(set(params) - saved)[:10]}, unexpected {sorted(saved - set(params))[:10]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    state = optimizer.state_dict()  # its param_groups list parameters by position
    ordered = [name for name, p in model.named_parameters() if p.requires_grad]
    state["state"] = {i: {key: tensors[f"adamw.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
                      for i, name in enumerate(ordered) if f"adamw.{name}.step" in tensors}
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda.0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
    np_kind, np_pos, np_has_gauss, np_gauss = meta["numpy_rng"]
    np.random.set_state((np_kind, tensors["rng.numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta["step"]


def last_good(checkpoint_path: Path) -> str:
    if not checkpoint_path.is_file():
        return "No checkpoint was written yet."
    with safe_open(checkpoint_path, "pt") as f:
        step = json.loads(f.metadata()["sds_clip"])["step"]
    return (f"The last good checkpoint, step {step}, is kept in {checkpoint_path}: continue with --resume "
            f"(perhaps with a lower --lr or --grad_clip)")


def logged_step(line: str) -> float:
    """The step of a log.jsonl line; infinite for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def export(model: SDSCLIP, args) -> None:
    """The fine-tuned CLIP as a Hugging Face folder (transformers' CLIPModel.from_pretrained and
    our load_clip read it), with the source's tokenizer files, and h_w in mapper.safetensors."""
    out = Path(args.out)
    save_clip(model.clip, out)
    for name in TOKENIZER_FILES:
        if (Path(args.clip) / name).is_file():
            shutil.copy(Path(args.clip) / name, out / name)
    mapper = {k: v.detach().cpu().contiguous() for k, v in model.mapper.state_dict().items()}
    save_file(mapper, out / "mapper.safetensors", metadata={"latent_shape": json.dumps(model.mapper.latent_shape)})


# ----------------------------------------------------------------------------- training


def main(argv=None) -> None:
    args = get_args(argv)

    # -- processes and devices: torchrun sets RANK/WORLD_SIZE; otherwise one process
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    else:
        rank, world = 0, 1
    master = rank == 0
    device = torch.device(args.device)
    # bf16 autocast on GPUs (the frozen SD models are stored in bf16); plain fp32 on the CPU.
    on_gpu = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    sd_dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.batch_size % world:
        raise SystemExit(f"train.py: --batch_size {args.batch_size} is not divisible by {world} processes")
    local_batch = args.batch_size // world
    out = Path(args.out)
    checkpoint_path = out / CHECKPOINT_FILE
    if checkpoint_path.exists() and not args.resume:
        raise SystemExit(f"train.py: {checkpoint_path} exists — pass --resume to continue it, or choose another --out")
    if args.resume and not checkpoint_path.is_file():
        raise SystemExit(f"train.py: --resume: {checkpoint_path} not found")

    # -- models: the CLIP to fine-tune, and SD's frozen UNet and text encoder
    sd = Path(args.sd)
    try:
        for folder in (Path(args.clip), sd / "unet", sd / "text_encoder", sd / "tokenizer"):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} not found — run `python weights/download.py`")
        clip = load_clip(args.clip, device)
        tokenizer = Tokenizer.from_pretrained(args.clip)
        unet = load_unet(sd / "unet", device, sd_dtype).requires_grad_(False)
        sd_text_encoder = load_clip(sd / "text_encoder", device, sd_dtype).requires_grad_(False)
        sd_tokenizer = Tokenizer.from_pretrained(sd / "tokenizer")
        dataset = CocoCaptions(args.coco_root, image_transform(clip.config.vision.image_size), args.limit_images, args.seed)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"train.py: {err}") from None
    unet.gradient_checkpointing = args.gradient_checkpointing
    schedule = NoiseSchedule()
    torch.manual_seed(args.seed)  # h_w's initial weights are a function of --seed alone
    mapper = Mapper.for_unet(clip.config.projection_dim, unet).to(device)  # h_w: (B, D) → (B, 4, 64, 64)

    # -- freeze everything but CLIP's LayerNorms (and h_w)
    freeze_all_but_layernorms(clip, args.image_layernorms_only)
    model = SDSCLIP(clip, mapper)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_layernorm = sum(p.numel() for p in clip.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in clip.parameters() if not p.requires_grad)
    n_sd = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in sd_text_encoder.parameters())
    ddp_model = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)

    # -- data order and length
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    batches_per_epoch = len(dataset) // args.batch_size // args.grad_accum * args.grad_accum
    steps_per_epoch = batches_per_epoch // args.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"train.py: {len(dataset)} images make no step of {args.batch_size} × {args.grad_accum}")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps

    step = load_checkpoint(checkpoint_path, model, optimizer, batches_per_epoch, args) if args.resume else 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
        log_lines = (out / LOG_FILE).read_text().splitlines() if args.resume and (out / LOG_FILE).exists() else []
        kept = [line for line in log_lines if logged_step(line) <= step]  # drop steps after the checkpoint
        (out / LOG_FILE).write_text("".join(line + "\n" for line in kept))
        print(f"trainable: {n_layernorm:,} CLIP LayerNorm + {sum(p.numel() for p in mapper.parameters()):,} h_w parameters; "
              f"frozen: {n_frozen:,} CLIP + {n_sd:,} SD UNet and text encoder")
        print(f"{len(dataset):,} images, batch {args.batch_size} ({world} process(es) × {local_batch}) × "
              f"{args.grad_accum} accumulation = {args.batch_size * args.grad_accum} per step; "
              f"{steps_per_epoch:,} steps per epoch, steps {step} → {last_step}; sds_mode {args.sds_mode}, λ = {args.sds_weight}")
        print(f"checkpoints every {args.save_every} steps: {checkpoint_path}; log: {out / LOG_FILE}")

    # -- the loop: loss = L_CLIP + λ · L_SDS, AdamW on the LayerNorms and h_w
    data = batches(dataset, sampler, local_batch, batches_per_epoch, step * args.grad_accum, args.num_workers)
    bad_images = []
    progress = tqdm(total=last_step, initial=step, disable=not master, desc="train")
    while step < last_step:
        start = time.perf_counter()
        lr = learning_rate(step, args, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(4, device=device)  # loss, clip_loss, sds_loss, images
        for micro in range(args.grad_accum):
            epoch, (pixels, indices, errors) = next(data)
            fatal = (bool(errors) and not args.skip_bad_images) or pixels is None
            if any_process(fatal, device):
                for error in errors:
                    print(f"train.py: {error}", file=sys.stderr)
                if pixels is None and not errors:
                    print("train.py: a batch has no readable image", file=sys.stderr)
                raise SystemExit(f"train.py: stopped at a missing or unreadable image{'' if args.skip_bad_images else ' (--skip_bad_images skips them)'}")
            bad_images += errors
            captions = [dataset.caption(i, epoch) for i in indices]
            ids = tokenizer(captions).to(device)
            with torch.no_grad(), autocast:  # c: SD's text encoder, last hidden state (B, 77, 768)
                context = sd_text_encoder.text_model(sd_tokenizer(captions, pad_token_id=sd_tokenizer.eot_id).to(device))
            # t ~ U{0..999} and ε ~ N(0, I) for the whole batch; this process's rows, as in `batches`.
            generator = step_generator(args.seed, step, micro)
            t = schedule.sample_timesteps(args.batch_size, generator)[rank::world][: len(indices)]
            noise = torch.randn(args.batch_size, *mapper.latent_shape, generator=generator)[rank::world][: len(indices)]
            last_micro = micro == args.grad_accum - 1
            with (contextlib.nullcontext() if last_micro or not distributed else ddp_model.no_sync()):
                with autocast:
                    image_embeds, text_embeds, l_sds = ddp_model(pixels.to(device), ids, unet, schedule, context,
                                                                 t.to(device), noise.to(device), args.sds_mode)
                    # The contrastive batch is every process's pairs: CLIP's logits over the gathered embeddings.
                    image_all = F.normalize(gather(image_embeds).float(), dim=-1)
                    text_all = F.normalize(gather(text_embeds).float(), dim=-1)
                    logits = clip.logit_scale.exp() * image_all @ text_all.t()  # (B, B)
                    l_clip = contrastive_loss(logits)
                    loss = l_clip + args.sds_weight * l_sds  # L = L_CLIP + λ·L_SDS
                if any_process(not torch.isfinite(loss).item(), device):
                    raise SystemExit(f"train.py: the loss is {loss.item()} at step {step} (clip {l_clip.item()}, "
                                     f"sds {l_sds.item()}); stopped. {last_good(checkpoint_path)}")
                (loss / args.grad_accum).backward()
            sums += torch.tensor([loss.item(), l_clip.item(), l_sds.item(), len(indices)], device=device)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or math.inf)
        if not torch.isfinite(grad_norm):
            raise SystemExit(f"train.py: the gradient norm is {grad_norm.item()} at step {step}; stopped. "
                             f"{last_good(checkpoint_path)}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if distributed:
            dist.all_reduce(sums)  # losses: mean over processes; images: their sum
        sums[:3] /= world * args.grad_accum
        if master:
            progress.update(1)
            progress.set_postfix(loss=f"{sums[0].item():.4f}", sds=f"{sums[2].item():.4f}")
            if (args.log_every and step % args.log_every == 0) or step == last_step:
                record = {"step": step, "loss": sums[0].item(), "clip_loss": sums[1].item(), "sds_loss": sums[2].item(),
                          "lr": lr, "grad_norm": grad_norm.item(), "images_per_s": sums[3].item() / (time.perf_counter() - start)}
                with open(out / LOG_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if (args.save_every and step % args.save_every == 0) or step == last_step:
                save_checkpoint(checkpoint_path, model, optimizer, step, batches_per_epoch, args)
    progress.close()

    if distributed:
        n_bad = torch.tensor([len(bad_images)], device=device)
        dist.all_reduce(n_bad)
    if master:
        export(model, args)
        print(f"done: step {step}; fine-tuned CLIP in {out} (mapper.safetensors holds h_w)")
        if args.skip_bad_images:
            total_bad = int(n_bad.item()) if distributed else len(bad_images)
            print(f"skipped {total_bad} missing or unreadable image(s)" + "".join(f"\n  {e}" for e in bad_images[:10]))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

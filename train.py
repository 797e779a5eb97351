"""Fine-tune CLIP with SDS-CLIP: contrastive loss + λ · score distillation from a frozen SD UNet.

SDS-CLIP (Basu et al. 2023, https://arxiv.org/abs/2307.09233), as in the paper: only CLIP's
LayerNorms (and the map h_w into the UNet's latent space) are trained, on MS-COCO 2017 train
captions, for 5 epochs at batch 32 with AdamW lr 5e-5 and λ = 0.001:

    L = L_CLIP(f_φ(x), g_φ(y)) + λ · L_SDS(ε_θ, h_w(f_φ(x)), c = SD-text-encoder(y))

Read top to bottom: the objective (`SDSCLIPLoss`), the loop (`train`), setup and finish, the
data, Winoground during training, then the plumbing a reader can skip (several processes,
checkpoints, resume, the log, the export).

Loads the CLIP to fine-tune (`--clip`), Stable Diffusion 1.x's unet/, text_encoder/ and
tokenizer/ (`--sd`) and COCO (`--coco_root`); `python weights/download.py` and
`python weights/download.py --coco weights/coco` fetch them. Writes checkpoints, a JSONL log
and finally the fine-tuned CLIP in Hugging Face layout (+ mapper.safetensors) to `--out`.

    python train.py --toy                            # the toy world (weights/toyworld.py) on a CPU: start here
    python train.py                                  # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py             # several GPUs: the same run, split
    python train.py --resume                         # continue from --out/checkpoint.safetensors
    python train.py --winoground weights/winoground  # Winoground scores before training and after each epoch
    python train.py --precision fp32                 # float32 throughout (default: bf16 on CUDA, fp32 on the CPU)

--sds_mode full (the default, the paper's loss) backpropagates through the UNet: at batch 32
that needs far more GPU memory than stopgrad; --gradient_checkpointing trades time for it.
A run stops when the loss, the gradient or the trained weights stop being finite, and names
its last good checkpoint; a resume may change --lr, --warmup_steps, --cosine, --epochs,
--grad_clip and --weight_decay (log.jsonl records the change), but not the weights, the
captions or any other setting that defines the run.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from clip import OPEN_CLIP_WEIGHTS, Tokenizer, hub_path, image_transform, load_clip, open_image, save_clip
from eval_winoground import Winoground, can_write, clip_scores, format_table, leaves_folder, score_examples, summarize
from sds import Mapper, NoiseSchedule, check_scheduler, contrastive_loss, encode_prompt, sds_loss
from unet import load_unet

CAPTIONS_FILE = "annotations/captions_train2017.json"
IMAGES_DIR = "train2017"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "log.jsonl"
TOY_OUT = "out/toy-sds-clip"
# Small files that make the exported folder a complete Hugging Face CLIP checkpoint.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json")
# A model folder's weights: the first of these it holds, in the order load_clip and load_unet try them.
WEIGHTS_FILES = ("model.safetensors", "model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", *OPEN_CLIP_WEIGHTS)
# Settings a resume may change: where things are (their content is checked instead, see `fingerprint`),
# how often to save, log and evaluate, and (SCHEDULE, logged when changed) how the update is scheduled
# and clipped, the cure for a diverging run. Everything else defines the run and must match the checkpoint.
RESUMABLE_CHANGES = {"clip", "sd", "coco_root", "out", "resume", "max_steps", "save_every", "log_every", "device",
                     "num_workers", "skip_bad_images", "gradient_checkpointing", "winoground", "toy"}
SCHEDULE = {"lr", "warmup_steps", "cosine", "epochs", "grad_clip", "weight_decay"}
ADAM_BETAS = (0.9, 0.999)  # torch's defaults
PRECISIONS = ("bf16", "fp32")  # --precision
MAX_LR = torch.finfo(torch.float32).max * (1 - ADAM_BETAS[0])  # AdamW's first step, lr / (1 − β₁), is a float32


# ----------------------------------------------------------------------------- the method


class SDSCLIPLoss(nn.Module):
    """The objective, L = L_CLIP + λ·L_SDS, on a batch of image–caption pairs (x, y).

    It holds what is trained, CLIP (only its LayerNorms keep requires_grad) and h_w, and how the
    loss is formed: λ, the SDS mode and SD's noise schedule. The frozen UNet ε_θ is an argument,
    not a submodule, so that DistributedDataParallel neither broadcasts nor watches its 860M
    parameters. With several processes L_CLIP contrasts every process's pairs; L_SDS is per pair."""

    def __init__(self, clip: nn.Module, mapper: Mapper, sds_weight: float, sds_mode: str):
        super().__init__()
        self.clip, self.mapper = clip, mapper
        self.sds_weight, self.sds_mode = sds_weight, sds_mode  # λ; "full" or "stopgrad"
        self.schedule = NoiseSchedule()  # SD 1.x's ᾱ_t

    def forward(self, pixels, ids, context, t, noise, unet):
        """pixels (B, 3, S, S), caption ids (B, 77), c (B, 77, D_c), t (B,), ε (B, 4, h, w) → (L, L_CLIP, L_SDS)."""
        image_embeds = self.clip.encode_image(pixels)  # f_φ(x), (B, D)
        text_embeds = self.clip.encode_text(ids)  # g_φ(y), (B, D)
        image_all = F.normalize(gather(image_embeds).float(), dim=-1)  # every process's rows, (B_all, D)
        text_all = F.normalize(gather(text_embeds).float(), dim=-1)
        logits = self.clip.logit_scale.exp() * image_all @ text_all.t()  # S_ij = e^τ cos(f_φ(x_i), g_φ(y_j))
        l_clip = contrastive_loss(logits)  # L_CLIP = ½ [CE(S, diag) + CE(Sᵀ, diag)]
        # L_SDS = E_{t,ε} ‖ε_θ(√ᾱ_t h_w(f_φ(x)) + √(1−ᾱ_t) ε, t, c) − ε‖²
        l_sds = sds_loss(unet, self.schedule, self.mapper, image_embeds, context, t=t, noise=noise, mode=self.sds_mode)
        loss = l_clip + self.sds_weight * l_sds  # L = L_CLIP + λ·L_SDS
        return loss, l_clip, l_sds


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


# ----------------------------------------------------------------------------- the loop


@dataclass
class Run:
    """What the loop works with; `setup` builds it."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    autocast: torch.autocast  # --precision: bf16 autocast, or disabled for fp32
    objective: SDSCLIPLoss  # CLIP and h_w: the trained module
    ddp: nn.Module  # the objective, wrapped in DistributedDataParallel when there are several processes
    unet: nn.Module  # ε_θ, frozen
    sd_text_encoder: nn.Module  # frozen
    sd_tokenizer: Tokenizer
    tokenizer: Tokenizer  # the fine-tuned CLIP's
    optimizer: torch.optim.Optimizer
    dataset: Dataset
    sampler: DistributedSampler
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int  # the schedule's length: --epochs
    last_step: int  # where this run stops: --max_steps or the end of --epochs
    identity: dict  # what the run trains from, by content (`fingerprint`)
    winoground: Winoground | None
    step: int = 0  # optimizer steps done
    saved_step: int | None = None  # the step of the last good checkpoint
    bad_images: list[str] = field(default_factory=list)  # skipped ones, with --skip_bad_images

    @property
    def master(self) -> bool:
        return self.rank == 0


def train(run: Run) -> None:
    """From run.step to run.last_step, nanoGPT's loop: data, loss, backward, clip, save, step, log.

    A checkpoint holds weights that have given a finite loss and gradient: the weights after step s
    are saved during step s + 1, once its loss and gradient are known, before AdamW changes them."""
    args, objective, optimizer = run.args, run.objective, run.optimizer
    trainable = [p for p in objective.parameters() if p.requires_grad]
    data = batches(run.dataset, run.sampler, args.batch_size // run.world, run.batches_per_epoch,
                   run.step * args.grad_accum, args.num_workers)
    progress = tqdm(total=run.last_step, initial=run.step, disable=not run.master, desc="train")
    if run.step == 0:
        evaluate(run)  # --winoground: the scores before training
    while run.step < run.last_step:
        step, start = run.step, time.perf_counter()
        lr = learning_rate(step, args, run.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(4, device=run.device)  # L, L_CLIP, L_SDS, images
        for micro in range(args.grad_accum):
            # data: images x, one caption y each (drawn per image and epoch), c = SD's text encoder(y), t and ε
            epoch, (pixels, indices, errors) = next(data)
            run.bad_images += check_images(pixels, errors, args.skip_bad_images, run.device)
            captions = [run.dataset.caption(i, epoch) for i in indices]
            ids = run.tokenizer(captions).to(run.device)
            with torch.no_grad(), run.autocast:
                context = encode_prompt(run.sd_text_encoder, run.sd_tokenizer, captions)  # c, (B, 77, D_c)
            # t ~ U{0, …, 999}, ε ~ N(0, I) for the global batch, from (seed, step, micro); this process's rows
            generator = step_generator(args.seed, step, micro)
            rows = slice(run.rank, None, run.world)
            t = objective.schedule.sample_timesteps(args.batch_size, generator)[rows][: len(indices)]
            noise = torch.randn(args.batch_size, *objective.mapper.latent_shape, generator=generator)[rows]
            # loss: L = L_CLIP + λ·L_SDS (DDP averages the gradients at the last micro-batch only)
            last_micro = micro == args.grad_accum - 1
            with contextlib.nullcontext() if last_micro or run.world == 1 else run.ddp.no_sync():
                with run.autocast:
                    loss, l_clip, l_sds = run.ddp(pixels.to(run.device), ids, context, t.to(run.device),
                                                  noise[: len(indices)].to(run.device), run.unet)
                if any_process(not torch.isfinite(loss).item(), run.device):
                    stop(run, f"the loss is {loss.item()} at step {step} (clip {l_clip.item()}, sds {l_sds.item()})")
                # backward: ∇_φ,w L / grad_accum, summed over the micro-batches
                (loss / args.grad_accum).backward()
            sums += torch.tensor([loss.item(), l_clip.item(), l_sds.item(), len(indices)], device=run.device)
        # clip: the gradient norm to --grad_clip (0: measured only)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or math.inf)
        if not torch.isfinite(grad_norm):
            stop(run, f"the gradient norm is {grad_norm.item()} at step {step}")
        # save: these weights have just given a finite loss and gradient; a checkpoint every --save_every steps
        if step > 0 and args.save_every and step % args.save_every == 0 and step != run.saved_step:
            checkpoint(run)
        # step: AdamW on the LayerNorms and h_w; stop if it left a weight or a moment non-finite
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if bad := nonfinite(trained_state(objective, optimizer)):
            stop(run, f"AdamW's update at step {step} left {len(bad)} non-finite tensor(s): {', '.join(bad[:3])}")
        run.step = step = step + 1
        # log: the progress bar, a log.jsonl line every --log_every steps; --winoground after each epoch and at the end
        log_step(run, progress, sums, lr, grad_norm.item(), time.perf_counter() - start)
        if step % run.steps_per_epoch == 0 or step == run.last_step:
            evaluate(run)
    progress.close()


# ----------------------------------------------------------------------------- setup and finish


def main(argv=None) -> None:
    run = setup(get_args(argv))
    train(run)
    finish(run)


def setup(args: argparse.Namespace) -> Run:
    """Processes and devices; the models, frozen but for CLIP's LayerNorms and h_w; AdamW; the data
    order; with --resume, the checkpoint's state once it is shown to continue this run."""
    rank, world, device = start_processes(args)
    if args.batch_size % world:
        raise SystemExit(f"train.py: --batch_size {args.batch_size} is not divisible by {world} processes")
    path = Path(args.out) / CHECKPOINT_FILE
    saved = open_checkpoint(path, args.resume)  # with --resume: (metadata, tensors)

    # models: the CLIP to fine-tune (float32: its LayerNorms are trained), SD's frozen UNet and text
    # encoder (bfloat16 with --precision bf16: half the memory, and autocast need not cast them each step), the data
    sd_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    try:
        winoground = Winoground(args.winoground) if args.winoground else None
        missing = [Path(p) for p in (args.clip, args.sd) if Path(p).parent == Path("weights") and not Path(p).exists()]
        if missing:  # download.py's folders (the defaults), not hub ids
            raise FileNotFoundError(f"{' and '.join(map(str, missing))} not found — run "
                                    f"`python weights/download.py {' '.join(p.name for p in missing)}`")
        clip_path, sd = hub_path(args.clip), hub_path(args.sd)  # a hub id: its snapshot in the local HF cache
        for folder in (clip_path, sd / "unet", sd / "text_encoder", sd / "tokenizer"):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} not found — run `python weights/download.py`")
        check_scheduler(sd)  # an ε-prediction model with SD's noise schedule
        clip, tokenizer = load_clip(clip_path, device), Tokenizer.from_pretrained(clip_path)
        unet = load_unet(sd / "unet", device, sd_dtype).requires_grad_(False)
        sd_text_encoder = load_clip(sd / "text_encoder", device, sd_dtype).requires_grad_(False)
        sd_tokenizer = Tokenizer.from_pretrained(sd / "tokenizer")
        size = clip.config.vision.image_size
        dataset = CocoCaptions(args.coco_root, image_transform(size), args.limit_images, args.seed, size)
        if winoground and saved and rank == 0:  # a resume scores Winoground first at an epoch's end: read it now
            for example in tqdm(winoground.examples, desc="winoground images"):
                winoground.images(example, size)
    except (FileNotFoundError, ValueError, ImportError) as err:  # ImportError: a parquet --winoground, no pyarrow
        raise SystemExit(f"train.py: {err}") from None
    unet.gradient_checkpointing = args.gradient_checkpointing
    identity = fingerprint(clip_path, sd, Path(args.coco_root))
    changes = check_resume(path, saved[0], args, identity) if saved else {}
    torch.manual_seed(args.seed)  # h_w's initial weights are a function of --seed alone
    mapper = Mapper.for_unet(clip.config.projection_dim, unet).to(device)  # h_w: (B, D) → (B, 4, 64, 64)

    # freeze everything but CLIP's LayerNorms (and h_w); the objective and AdamW
    freeze_all_but_layernorms(clip, args.image_layernorms_only)
    objective = SDSCLIPLoss(clip, mapper, args.sds_weight, args.sds_mode)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=ADAM_BETAS, weight_decay=args.weight_decay)

    # data order and length
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    batches_per_epoch = len(dataset) // args.batch_size // args.grad_accum * args.grad_accum
    steps_per_epoch = batches_per_epoch // args.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"train.py: {len(dataset)} images make no step of {args.batch_size} × {args.grad_accum}")
    total_steps = args.epochs * steps_per_epoch
    step = restore(path, saved, objective, optimizer, batches_per_epoch) if saved else 0
    # bf16: matmuls and convolutions in bfloat16 under autocast; the trained parameters, their gradients and
    # AdamW's moments stay float32, since a LayerNorm update of lr 5e-5 is far below bfloat16's resolution near 1.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    ddp = DistributedDataParallel(objective) if dist.is_initialized() else objective
    run = Run(args=args, rank=rank, world=world, device=device, autocast=autocast, objective=objective, ddp=ddp,
              unet=unet, sd_text_encoder=sd_text_encoder, sd_tokenizer=sd_tokenizer, tokenizer=tokenizer,
              optimizer=optimizer, dataset=dataset, sampler=sampler, batches_per_epoch=batches_per_epoch,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              last_step=min(total_steps, args.max_steps) if args.max_steps else total_steps, identity=identity,
              winoground=winoground, step=step, saved_step=step if saved else None)
    if run.master:
        start_log(Path(args.out), step, changes, args.resume)
        report(run)
    return run


def report(run: Run) -> None:
    """What a user needs to trust the run: what is trained and frozen, the batch, the steps, where things go."""
    args, clip, out = run.args, run.objective.clip, Path(run.args.out)
    n_layernorm = sum(p.numel() for p in clip.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in clip.parameters() if not p.requires_grad)
    n_mapper = sum(p.numel() for p in run.objective.mapper.parameters())
    n_sd = sum(p.numel() for m in (run.unet, run.sd_text_encoder) for p in m.parameters())
    print(f"trainable: {n_layernorm:,} CLIP LayerNorm + {n_mapper:,} h_w parameters; "
          f"frozen: {n_frozen:,} CLIP + {n_sd:,} SD UNet and text encoder")
    print(run.dataset.summary())
    print(f"{len(run.dataset):,} images, batch {args.batch_size} ({run.world} process(es) × "
          f"{args.batch_size // run.world}) × {args.grad_accum} accumulation = {args.batch_size * args.grad_accum} "
          f"per step; {run.steps_per_epoch:,} steps per epoch, steps {run.step} → {run.last_step}; "
          f"sds_mode {args.sds_mode}, λ = {args.sds_weight}")
    print(f"precision {args.precision}: " + ("bfloat16 autocast, SD's UNet and text encoder held in bfloat16, the "
                                             "trained parameters and AdamW's state in float32"
                                             if args.precision == "bf16" else "float32 throughout"))
    print(f"checkpoints every {args.save_every} steps: {out / CHECKPOINT_FILE}; log: {out / LOG_FILE}")


def finish(run: Run) -> None:
    """The final checkpoint and the export; the skipped images; Winoground before and after."""
    if run.step != run.saved_step:
        checkpoint(run)  # the last step's loss was finite and its update left the weights finite
    n_bad = torch.tensor([len(run.bad_images)], device=run.device)
    if dist.is_initialized():
        dist.all_reduce(n_bad)
    if run.master:
        export(run.objective, run.args)
        print(f"done: step {run.step}; fine-tuned CLIP in {run.args.out} (mapper.safetensors holds h_w)")
        if run.args.skip_bad_images:
            print(f"skipped {int(n_bad.item())} missing or unreadable image(s)"
                  + "".join(f"\n  {e}" for e in run.bad_images[:10]))
        if run.winoground is not None:
            print(winoground_table(Path(run.args.out) / LOG_FILE))
    if dist.is_initialized():
        dist.destroy_process_group()


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="weights/clip-vit-base-patch32",
                   help="CLIP to fine-tune (Hugging Face folder, or a hub id in the local HF cache)")
    p.add_argument("--sd", default="weights/stable-diffusion-v1-4",
                   help="Stable Diffusion 1.x or 2.x-base folder (diffusers layout), or a hub id in the local HF cache")
    p.add_argument("--coco_root", default="weights/coco", help="MS-COCO 2017 folder: train2017/ and annotations/")
    p.add_argument("--out", default="out/sds-clip", help="checkpoints, log.jsonl and the final model")
    p.add_argument("--epochs", type=int, default=5, help="passes over the images (paper: 5)")
    p.add_argument("--batch_size", type=int, default=32,
                   help="image–caption pairs per contrastive batch, all processes together (paper: 32)")
    p.add_argument("--grad_accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (paper: 5e-5)")
    p.add_argument("--weight_decay", type=float, default=0.0,
                   help="AdamW weight decay (LayerNorm gains are usually not decayed)")
    p.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--cosine", action="store_true",
                   help="cosine decay of the learning rate to 0 at the end of --epochs")
    p.add_argument("--grad_clip", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--sds_weight", type=float, default=0.001, help="λ, the weight of the SDS loss (paper: 0.001)")
    p.add_argument("--sds_mode", choices=("full", "stopgrad"), default="full",
                   help="full: the paper's loss through the UNet; stopgrad: DreamFusion's SDS gradient")
    p.add_argument("--image_layernorms_only", action="store_true",
                   help="train only the image tower's LayerNorms (and h_w)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute UNet activations in backward (less memory)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    p.add_argument("--limit_images", type=int, default=0, help="use only the first N COCO images (0: all)")
    p.add_argument("--skip_bad_images", action="store_true", help="skip (and count) missing or unreadable images")
    p.add_argument("--save_every", type=int, default=1000,
                   help="write a checkpoint every N steps and at the end (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--log_every", type=int, default=1, help="one log.jsonl line every N steps")
    p.add_argument("--num_workers", type=int, default=4, help="data-loading processes per training process")
    p.add_argument("--seed", type=int, default=0, help="seeds h_w's init, data order, captions, t and ε")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="bf16: autocast, SD frozen in bfloat16, trained weights and AdamW in float32; fp32: float32 "
                        "throughout (default: bf16 on CUDA, fp32 otherwise)")
    p.add_argument("--winoground", help="Winoground folder (examples.jsonl + images/): CLIP's text / image / group "
                                        "scores before training, after every epoch and at the end, in log.jsonl")
    p.add_argument("--toy", action="store_true",
                   help="the toy world of weights/toyworld.py (built on first use): its CLIP, SD, data, test split "
                        f"(--winoground) and settings become the defaults, --out {TOY_OUT}")
    args = p.parse_args(argv)
    if args.toy:
        p.set_defaults(**toy_defaults(p))
        args = p.parse_args(argv)  # what the command line says still wins
    args.precision = args.precision or default_precision(args.device)  # resolved here: a checkpoint records it
    check_settings(p, args)
    return args


def toy_defaults(p: argparse.ArgumentParser) -> dict:
    """--toy: the toy world's files and TRAIN_DEFAULTS as defaults (weights/toyworld.py builds them first)."""
    if "RANK" in os.environ:
        p.error("--toy builds its world in one process: start it with `python train.py --toy`, not torchrun")
    from weights.toyworld import TRAIN_DEFAULTS, build  # only --toy needs the recipe of the toy world
    unknown = sorted(set(TRAIN_DEFAULTS) - set(vars(p.parse_args([]))))
    if unknown:
        p.error(f"weights/toyworld.py's TRAIN_DEFAULTS name settings train.py does not have: {unknown}")
    paths = build()
    return {"clip": str(paths["clip"]), "sd": str(paths["sd"]), "coco_root": str(paths["train"]),
            "winoground": str(paths["test"]), "out": TOY_OUT, **TRAIN_DEFAULTS}


def default_precision(device: str) -> str:
    return "bf16" if str(device).startswith("cuda") else "fp32"


def check_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse's one-line error for a value no run can use."""
    if not 0 < args.lr <= MAX_LR:  # also false for NaN
        p.error(f"--lr must be a number above 0 and at most {MAX_LR:.3g} (AdamW's first step, lr / (1 − β₁), "
                f"must be a float32); got {args.lr}")
    for name in ("sds_weight", "grad_clip", "weight_decay"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            p.error(f"--{name} must be a finite number, 0 or more; got {value}")
    if args.lr * args.weight_decay >= 1:
        p.error(f"--lr × --weight_decay must be below 1 (AdamW scales the weights by 1 − lr·weight_decay "
                f"each step); got {args.lr} × {args.weight_decay}")
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be 1 or more; got {getattr(args, name)}")
    for name in ("warmup_steps", "max_steps", "limit_images", "save_every", "log_every", "num_workers", "seed"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be 0 or more; got {getattr(args, name)}")
    if not can_write(Path(args.out)):  # now, not after the models have loaded
        p.error(f"--out {args.out} cannot be written (a file or a read-only folder is in its way); pass another --out")


# ----------------------------------------------------------------------------- data


class CocoCaptions(Dataset):
    """MS-COCO 2017 train: item i is image i (images sorted by id) as CLIP pixels; its captions
    are kept here, and `caption(i, epoch)` draws one of them per image and epoch. Entries of the
    captions file that cannot be used (a caption that is not text, an image without captions or
    with a non-integer id, a repeated image) are left out and counted: summary() reports them."""

    def __init__(self, root: str | Path, transform, limit_images: int = 0, seed: int = 0,
                 image_size: int | None = None):
        root, self.transform, self.seed, self.image_size = Path(root), transform, seed, image_size
        self.file = file = root / CAPTIONS_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found — run `python weights/download.py --coco {root}`")
        try:
            images, captions, self.skipped = self._index(json.loads(file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{file} is not a COCO captions file ({type(err).__name__}: {err}) — "
                             f"run `python weights/download.py --coco {root}` again") from None
        images = images[:limit_images] if limit_images else images
        if not images:
            raise ValueError(f"{file} lists no captioned images")
        self.files = [root / IMAGES_DIR / name for _, name in images]
        self.captions = [captions[image_id] for image_id, _ in images]

    @staticmethod
    def _index(data: dict) -> tuple[list[tuple[int, str]], dict[int, list[str]], dict[str, list[str]]]:
        """The usable images as (id, file name) sorted by id, the captions of each id, and what was
        left out: {reason: [the entries, shortly]}."""
        skipped = defaultdict(list)
        captions = defaultdict(list)
        for ann in data["annotations"]:
            if isinstance(ann["caption"], str):
                captions[ann["image_id"]].append(ann["caption"].strip())
            else:
                skipped["annotations whose caption is not text"].append(f"id {ann.get('id')}: {ann['caption']!r}")
        images, seen = [], set()
        for image in data["images"]:
            image_id, name = image["id"], image["file_name"]
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                skipped["images whose id is not an integer"].append(repr(image_id))
                continue
            if image_id in seen:
                skipped["repeated image entries (the first is kept)"].append(str(image_id))
                continue
            seen.add(image_id)
            if not isinstance(name, str):
                skipped["images whose file_name is not text"].append(f"id {image_id}: {name!r}")
            elif leaves_folder(name):  # never read from outside train2017/
                skipped["images whose file_name is absolute or goes up with '..'"].append(f"id {image_id}: {name!r}")
            elif image_id not in captions:
                skipped["images without captions"].append(str(image_id))
            else:
                images.append((image_id, name))
        for key in [key for key in captions if key not in seen]:  # an image_id written as a string, say
            skipped["captions of no listed image"] += [f"image_id {key!r}"] * len(captions[key])
        return sorted(images), captions, dict(skipped)

    def summary(self) -> str:
        """What was read from the captions file, and one line per kind of entry left out, with examples."""
        lines = [f"{self.file}: {len(self):,} images with {sum(map(len, self.captions)):,} captions"]
        for reason, entries in self.skipped.items():
            shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
            lines.append(f"  left out {len(entries):,} {reason} ({shown})")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        """(pixels, index, None), or (None, index, why) for a missing, unreadable or too large image."""
        file = self.files[index]
        try:
            return self.transform(open_image(file, size=self.image_size)), index, None
        except FileNotFoundError:
            return None, index, f"{file} not found"
        except ValueError as err:  # open_image's one sentence, naming the file
            return None, index, str(err)

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


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of t and ε for one batch: a function of (seed, step, micro-batch) alone,
    so that a resumed run and every process of a distributed run draw one process's numbers.
    (Every draw of a run comes from such a seeded generator, or the caption draw's (seed, epoch,
    index): the global RNG seeds only h_w's init, so a checkpoint need not hold any RNG state.)"""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0]))


def check_images(pixels, errors: list[str], skip_bad_images: bool, device) -> list[str]:
    """A batch's missing or unreadable images: stop at them on every process, unless --skip_bad_images
    (or no image of the batch is readable); returns them, to count."""
    if any_process((bool(errors) and not skip_bad_images) or pixels is None, device):
        for error in errors:
            print(f"train.py: {error}", file=sys.stderr)
        if pixels is None and not errors:
            print("train.py: a batch has no readable image", file=sys.stderr)
        raise SystemExit("train.py: stopped at a missing or unreadable image"
                         + ("" if skip_bad_images else " (--skip_bad_images skips them)"))
    return errors


# ----------------------------------------------------------------------------- Winoground during training


def evaluate(run: Run) -> None:
    """--winoground: the CLIP's scores at this step, printed as one line and logged (master process only)."""
    if run.winoground is None or not run.master:
        return
    try:
        scores = winoground_scores(run.objective.clip, run.tokenizer, run.winoground, run.device)
    except ValueError as err:  # an unreadable image
        raise SystemExit(f"train.py: --winoground: {err}") from None
    epoch = run.step / run.steps_per_epoch
    tqdm.write(f"winoground, step {run.step} (epoch {epoch:g}): text {scores['text']:.2f}  image {scores['image']:.2f}"
               f"  group {scores['group']:.2f}  ({scores['n']} examples)")
    append_log(run, {"step": run.step, "epoch": epoch, "winoground": scores})


@torch.no_grad()
def winoground_scores(clip: nn.Module, tokenizer: Tokenizer, data: Winoground, device) -> dict:
    """Text / image / group scores (%) of `clip` on `data`, overall and by tag: in eval mode, without
    gradients, and without drawing from any generator that training uses."""
    was_training = clip.training
    clip.eval()
    records = score_examples(data.examples, clip_scores(clip, tokenizer, data, data.examples, device=device))
    clip.train(was_training)
    summary = summarize(records)
    return {key: summary["all"][key] for key in ("n", "text", "image", "group")} | {
        "by_tag": {name: row for name, row in summary.items() if name != "all"}}


def winoground_table(log_file: Path) -> str:
    """The first and the last Winoground scores of log.jsonl: before and after fine-tuning."""
    records = [r for r in map(json.loads, log_file.read_text().splitlines()) if "winoground" in r]
    if not records:
        return "winoground: no scores in log.jsonl"
    first, last = records[0], records[-1]
    rows = {f"before (step {first['step']})": first["winoground"], f"after (step {last['step']})": last["winoground"]}
    return format_table(rows, "Winoground, CLIP scores (chance 25 / 25 / 16.67)")


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


def start_processes(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; otherwise one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    return dist.get_rank(), dist.get_world_size(), torch.device(args.device)


# ----------------------------------------------------------------------------- checkpoints, resume, log, export


def trained_state(objective: SDSCLIPLoss, optimizer) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the trained parameters, "param.<name>", and AdamW's state per parameter,
    "adamw.<name>.step", ".exp_avg" (m) and ".exp_avg_sq" (v)."""
    names = {p: name for name, p in objective.named_parameters()}
    state = {f"param.{name}": p.detach() for name, p in objective.named_parameters() if p.requires_grad}
    for p, moments in optimizer.state.items():
        state.update({f"adamw.{names[p]}.{key}": value.detach() for key, value in moments.items()})
    return state


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of `state` whose tensor holds a NaN or an infinity (one device sync for all)."""
    keys = [key for key in state if not key.endswith(".step")]  # AdamW's step counts live on the CPU
    finite = torch.stack([torch.isfinite(state[key]).all() for key in keys]).tolist() if keys else []
    return [key for key, ok in zip(keys, finite) if not ok]


def write_atomically(path: Path, data: bytes) -> None:
    """A reader, or a crash, sees the old file or the new one, never part of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """One safetensors file: `trained_state`, and `meta` (step, settings, identity) as JSON metadata."""
    if bad := nonfinite(state):
        raise ValueError(f"{path}: a checkpoint holds finite tensors only; these are not: {', '.join(bad[:3])}")
    tensors = {key: value.cpu().contiguous() for key, value in state.items()}
    write_atomically(path, save(tensors, metadata={"sds_clip": json.dumps(meta)}))


def checkpoint(run: Run) -> None:
    """Save the current weights (the master process writes them) as the last good ones."""
    if run.master:
        meta = {"step": run.step, "batches_per_epoch": run.batches_per_epoch, "settings": vars(run.args),
                "identity": run.identity}
        save_checkpoint(Path(run.args.out) / CHECKPOINT_FILE, trained_state(run.objective, run.optimizer), meta)
    run.saved_step = run.step


def stop(run: Run, what: str):
    """End a diverging run (on every process), naming the checkpoint to continue from."""
    path = Path(run.args.out) / CHECKPOINT_FILE
    last_good = ("No checkpoint was written yet." if run.saved_step is None else
                 f"The last good checkpoint, step {run.saved_step}, is kept in {path}: continue with --resume "
                 f"(perhaps with a lower --lr or a --grad_clip)")
    raise SystemExit(f"train.py: {what}; stopped. {last_good}")


def open_checkpoint(path: Path, resume: bool) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """With --resume, the checkpoint to continue; without, there must be none to overwrite."""
    if path.exists() and not resume:
        raise SystemExit(f"train.py: {path} exists — pass --resume to continue it, or choose another --out")
    if resume and not path.is_file():
        raise SystemExit(f"train.py: --resume: {path} not found")
    return read_checkpoint(path) if resume else None


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's metadata and tensors, or one line saying that the file cannot be resumed."""
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})["sds_clip"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        # A KeyError or TypeError says the metadata is not ours, or was edited by hand.
        kinds = {"step": int, "batches_per_epoch": int, "settings": dict, "identity": dict}
        wrong = [key for key, kind in kinds.items() if not isinstance(meta[key], kind) or isinstance(meta[key], bool)]
        if wrong or not all(isinstance(entry, dict) for entry in meta["identity"].values()):
            raise TypeError(f"metadata {wrong or ['identity']} of the wrong type")
        if bad := nonfinite(tensors):  # train.py saves finite tensors only
            raise ValueError(f"NaN or infinite values in {', '.join(bad[:3])}")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"train.py: {path} is not a checkpoint this train.py can resume ({type(err).__name__}: "
                         f"{err}): it may be damaged, or written by another program or an older train.py; "
                         f"move it away to start afresh there, or pass another --out") from None
    return meta, tensors


def fingerprint(clip: Path, sd: Path, coco_root: Path) -> dict:
    """What a run trains from, by content: the sha256 of the CLIP's, the UNet's and SD's text encoder's
    weights files and of the captions file (as the Hugging Face hub's LFS ids; ≈ 0.7 GB/s on one core:
    some 7 s for ViT-B/32 + SD 1.x, 4.6 GB, at each start)."""
    files = {"clip": clip, "unet": sd / "unet", "text_encoder": sd / "text_encoder"}
    files = {key: next(folder / name for name in WEIGHTS_FILES if (folder / name).is_file())
             for key, folder in files.items()} | {"captions": coco_root / CAPTIONS_FILE}
    identity = {}
    for key, file in files.items():
        with open(file, "rb") as f:
            identity[key] = {"file": str(file), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return identity


def check_resume(path: Path, meta: dict, args: argparse.Namespace, identity: dict) -> dict:
    """Refuse, in one line, a resume that would not continue the checkpoint's run: other weights, other
    captions, other settings. Returns the SCHEDULE settings it changes, {name: [old, new]}."""
    for key, now in identity.items():
        then = meta["identity"].get(key, {})
        if then.get("sha256") != now["sha256"]:
            raise SystemExit(f"train.py: {path} was trained from {then.get('file')} (sha256 "
                             f"{str(then.get('sha256'))[:12]}…), not from {now['file']} "
                             f"(sha256 {now['sha256'][:12]}…): resume with the same {key} file, "
                             f"or start afresh with another --out")
    # --precision defines a run (it changes every loss and gradient) and is never forced by the device: both
    # run anywhere. A checkpoint from before --precision existed ran in its device's default.
    saved = {"precision": default_precision(meta["settings"].get("device", "cpu"))} | meta["settings"]
    changed = {name: [saved.get(name), value] for name, value in vars(args).items()
               if name not in RESUMABLE_CHANGES and saved.get(name) != value}
    fixed = [f"--{name} {old!r} → {new!r}" for name, (old, new) in changed.items() if name not in SCHEDULE]
    if fixed:
        raise SystemExit(f"train.py: {path} was written with other settings ({'; '.join(fixed)}); "
                         f"resume with the same ones or start afresh with another --out")
    return changed


def restore(path: Path, saved: tuple[dict, dict], objective: SDSCLIPLoss, optimizer, batches_per_epoch: int) -> int:
    """Put a checkpoint's trained parameters and AdamW state in place; returns its step."""
    meta, tensors = saved
    if meta["batches_per_epoch"] != batches_per_epoch:
        raise SystemExit(f"train.py: {path} was written with {meta['batches_per_epoch']} batches per epoch, this "
                         f"dataset makes {batches_per_epoch}: the data order cannot be resumed")
    params = {name: p for name, p in objective.named_parameters() if p.requires_grad}
    saved_names = {key[len("param."):] for key in tensors if key.startswith("param.")}
    if saved_names != set(params):
        missing, unexpected = sorted(set(params) - saved_names), sorted(saved_names - set(params))
        raise SystemExit(f"train.py: {path} holds other trained parameters than this run "
                         f"(missing {missing[:10]}, unexpected {unexpected[:10]})")
    wrong = [f"{name} {tuple(tensors[f'param.{name}'].shape)} ≠ {tuple(p.shape)}" for name, p in params.items()
             if tensors[f"param.{name}"].shape != p.shape]
    if wrong:
        raise SystemExit(f"train.py: {path} holds parameters of other shapes than this CLIP: {', '.join(wrong[:3])}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    state = optimizer.state_dict()  # its param_groups list parameters by position
    state["state"], wrong = {}, []
    for i, (name, p) in enumerate(params.items()):
        moments = {key: tensors.get(f"adamw.{name}.{key}") for key in ("step", "exp_avg", "exp_avg_sq")}
        if any(value is not None for value in moments.values()):  # none: AdamW has not updated p yet
            shapes = {"step": (), "exp_avg": p.shape, "exp_avg_sq": p.shape}
            wrong += [f"adamw.{name}.{key}" for key, value in moments.items()
                      if value is None or value.shape != shapes[key]]
            state["state"][i] = moments
    if wrong:
        raise SystemExit(f"train.py: {path} holds AdamW moments that are missing or of the wrong shape: "
                         f"{', '.join(wrong[:3])}; move it away to start afresh there, or pass another --out")
    optimizer.load_state_dict(state)
    return meta["step"]


def log_position(line: str) -> float:
    """Where a log.jsonl line falls: its step; a resume's "changed" line just after its step (a new
    resume from that step writes its own); infinity for a line a killed run left half-written."""
    try:
        record = json.loads(line)
        return record["step"] + (0.5 if "changed" in record else 0)
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def start_log(out: Path, step: int, changes: dict, resume: bool) -> None:
    """log.jsonl: empty for a new run; on resume, its lines up to the checkpoint's step, rewritten
    atomically, then one line with the settings this resume changes, if any."""
    out.mkdir(parents=True, exist_ok=True)
    file = out / LOG_FILE
    try:
        lines = file.read_text(encoding="utf-8").splitlines() if resume and file.exists() else []
    except UnicodeDecodeError as err:
        raise SystemExit(f"train.py: {file} is not UTF-8 text (byte {err.start}: {err.reason}); fix that line, or "
                         f"move the file away to resume with a new log") from None
    kept = [line for line in lines if log_position(line) <= step]
    if changes:
        kept.append(json.dumps({"step": step, "changed": changes}))
    write_atomically(file, "".join(line + "\n" for line in kept).encode())


def log_step(run: Run, progress: tqdm, sums: torch.Tensor, lr: float, grad_norm: float, seconds: float) -> None:
    """After step run.step: sums = (L, L_CLIP, L_SDS, images) over this process's micro-batches."""
    if run.world > 1:
        dist.all_reduce(sums)  # Σ over processes
    loss, l_clip, l_sds = (sums[:3] / (run.world * run.args.grad_accum)).tolist()  # means over micro-batches
    if not run.master:
        return
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", sds=f"{l_sds:.4f}")
    if (run.args.log_every and run.step % run.args.log_every == 0) or run.step == run.last_step:
        append_log(run, {"step": run.step, "loss": loss, "clip_loss": l_clip, "sds_loss": l_sds, "lr": lr,
                         "grad_norm": grad_norm, "images_per_s": sums[3].item() / seconds})


def append_log(run: Run, record: dict) -> None:
    with open(Path(run.args.out) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def export(model: SDSCLIPLoss, args) -> None:
    """The fine-tuned CLIP as a Hugging Face folder (transformers' CLIPModel.from_pretrained and
    our load_clip read it), with the source's tokenizer files, and h_w in mapper.safetensors."""
    out, source = Path(args.out), hub_path(args.clip)
    save_clip(model.clip, out)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    mapper = {k: v.detach().cpu().contiguous() for k, v in model.mapper.state_dict().items()}
    save_file(mapper, out / "mapper.safetensors", metadata={"latent_shape": json.dumps(model.mapper.latent_shape)})


if __name__ == "__main__":
    main()

"""Fine-tune CLIP with SDS-CLIP: contrastive loss + λ · score distillation from a frozen SD UNet.

SDS-CLIP (Basu et al. 2023, https://arxiv.org/abs/2307.09233), as in the paper: only CLIP's
LayerNorms (and the map h_w into the UNet's latent space) are trained, on MS-COCO 2017 train
captions, for 5 epochs at batch 32 with AdamW lr 5e-5 and λ = 0.001 (--trainable image or all
trains more of CLIP; --mapper fitted fits h_w to SD's latents first and freezes it):

    L = L_CLIP(f_φ(x), g_φ(y)) + λ · L_SDS(ε_θ, h_w(f_φ(x)), c = SD-text-encoder(y))

Read top to bottom: the objective (`SDSCLIPLoss`), the loop (`train`), setup and finish, the
arguments, several processes. What it reads and writes is in weights/: runs.py (checkpoints and
resume, the log, the export), coco.py (the data), networks.py (the models).

Loads the CLIP to fine-tune (`--clip`), Stable Diffusion 1.x's unet/, text_encoder/ and
tokenizer/ (`--sd`) and COCO (`--coco_root`); `python weights/download.py` and
`python weights/download.py --coco weights/coco` fetch them. Writes checkpoints, a JSONL log
and finally the fine-tuned CLIP in Hugging Face layout (+ mapper.safetensors) to `--out`.

    python train.py --toy                 # the toy world (weights/toyworld/) on a CPU: start here
    python train.py                       # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py  # several GPUs: the same run, split
    python train.py --resume              # continue from --out/checkpoint.safetensors
    python train.py --winoground weights/winoground  # Winoground before training, after each epoch
    python train.py --precision fp32      # float32 throughout (default: bf16 on CUDA, else fp32)
    python train.py --trainable all --mapper fitted  # every CLIP weight; h_w fitted, then frozen

--sds_mode full (the default, the paper's loss) backpropagates through the UNet: at batch 32
that needs far more GPU memory than stopgrad; --gradient_checkpointing trades time for it.
A run stops when the loss, the gradient or the trained weights stop being finite, and names
its last good checkpoint; a resume may change --lr, --warmup_steps, --cosine, --epochs,
--grad_clip and --weight_decay (log.jsonl records the change), but not the weights, the
captions or any other setting that defines the run.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from clip import Tokenizer
from eval_winoground import PRECISIONS, autocast, clip_scores, format_table, score_examples
from eval_winoground import summarize
from sds import Mapper, NoiseSchedule, contrastive_loss, encode_prompt, fit_mapper, r_squared
from sds import sd_image_transform, sds_loss
from weights.coco import CocoCaptions, batches, check_images, image_chunks
from weights.networks import load_vae
from weights.runs import CHECKPOINT_FILE, LOG_FILE, append_log, check_resume, export
from weights.runs import default_precision, fingerprint, gradient_summary, log_step, nonfinite
from weights.runs import out_problem, read_checkpoint, read_sources, restore, save_checkpoint
from weights.runs import start_log, trained_state
from weights.winoground import Winoground

TOY_OUT = "out/toy-sds-clip"
ADAM_BETAS = (0.9, 0.999)  # torch's defaults
MAX_LR = torch.finfo(torch.float32).max * (1 - ADAM_BETAS[0])  # AdamW's first step, lr / (1 − β₁)


# ----------------------------------------------------------------------------- the method


class SDSCLIPLoss(nn.Module):
    """The objective, L = L_CLIP + λ·L_SDS, on a batch of image–caption pairs (x, y).

    It holds what is trained, CLIP (the paper: only its LayerNorms keep requires_grad) and h_w, and
    how the loss is formed: λ, the SDS mode and SD's noise schedule. The frozen UNet ε_θ is an
    argument, not a submodule, so that DistributedDataParallel neither broadcasts nor watches its
    860M parameters. With several processes L_CLIP contrasts every process's pairs; L_SDS is per
    pair. `embed_grad_sq` adds up ‖∂L_CLIP/∂f‖² and ‖∂(λ·L_SDS)/∂f‖², what each term sends to
    CLIP's image embedding f = f_φ(x), as backward passes (`watch`; the loop reads and resets it)."""

    def __init__(self, clip: nn.Module, mapper: Mapper, sds_weight: float, sds_mode: str):
        super().__init__()
        self.clip, self.mapper = clip, mapper
        self.sds_weight, self.sds_mode = sds_weight, sds_mode  # λ; "full" or "stopgrad"
        self.schedule = NoiseSchedule()  # SD 1.x's ᾱ_t
        self.embed_grad_sq = torch.zeros(2)  # [L_CLIP, λ·L_SDS]; not a buffer: DDP would broadcast it

    def forward(self, pixels, ids, context, t, noise, unet):
        """x (B, 3, S, S), y's ids (B, 77), c (B, 77, D_c), t (B,), ε (B, 4, h, w) → 3 losses."""
        image_embeds = self.clip.encode_image(pixels)  # f_φ(x), (B, D)
        f_clip, f_sds = self.watch(image_embeds)  # f_φ(x) twice: one view for each loss term
        text_embeds = self.clip.encode_text(ids)  # g_φ(y), (B, D)
        image_all = F.normalize(gather(f_clip).float(), dim=-1)  # every process's, (B_all, D)
        text_all = F.normalize(gather(text_embeds).float(), dim=-1)
        logits = self.clip.logit_scale.exp() * image_all @ text_all.t()  # S_ij = e^τ cos(f_i, g_j)
        l_clip = contrastive_loss(logits)  # L_CLIP = ½ [CE(S, diag) + CE(Sᵀ, diag)]
        # L_SDS = E_{t,ε} ‖ε_θ(√ᾱ_t h_w(f_φ(x)) + √(1−ᾱ_t) ε, t, c) − ε‖²
        l_sds = sds_loss(unet, self.schedule, self.mapper, f_sds, context, t=t, noise=noise,
                         mode=self.sds_mode)
        loss = l_clip + self.sds_weight * l_sds  # L = L_CLIP + λ·L_SDS
        return loss, l_clip, l_sds

    def watch(self, image_embeds: torch.Tensor) -> list[torch.Tensor]:
        """Two views of f_φ(x) whose backward hooks add each term's ‖∂L/∂f‖² to embed_grad_sq: no
        extra backward pass, two (B, D) squared sums a step. (Under several processes a hook sees W
        times one process's share of the gradient: the loop divides the norm by W.)"""
        views = [image_embeds.view_as(image_embeds) for _ in range(2)]
        if image_embeds.requires_grad:  # not in eval, nor when nothing of the image tower trains
            for k, view in enumerate(views):
                view.register_hook(functools.partial(self.add_grad_sq, k))
        return views

    def add_grad_sq(self, k: int, grad: torch.Tensor) -> None:
        self.embed_grad_sq[k] += grad.detach().float().pow(2).sum()  # ‖∂L/∂f‖² over the batch


def gather(x: torch.Tensor) -> torch.Tensor:
    return GatherWithGrad.apply(x) if dist.is_initialized() else x


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
        padded = F.pad(x, (0, 0, 0, max(ctx.rows) - x.shape[0])).contiguous()  # equal shapes
        gathered = [torch.empty_like(padded) for _ in ctx.rows]
        dist.all_gather(gathered, padded)
        return torch.cat([g[:n] for g, n in zip(gathered, ctx.rows)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = all_sum(grad.contiguous())  # Σ over processes of ∂L_r/∂(all rows)
        start = sum(ctx.rows[: dist.get_rank()])
        return grad[start: start + ctx.rows[dist.get_rank()]]


TRAINABLE = {"layernorm": "CLIP LayerNorm", "image": "CLIP image tower + every LayerNorm",
             "all": "CLIP (every weight)"}  # --trainable: what each choice trains


def set_trainable(clip: nn.Module, trainable: str = "layernorm", image_only: bool = False) -> None:
    """requires_grad for what --trainable names, every other CLIP weight frozen. "layernorm" (the
    paper): the weight and bias of every nn.LayerNorm (pre_layrnorm, the layer_norm1/2 of each
    block, post_layernorm, final_layer_norm), or with `image_only` of the image tower's only;
    "image": every weight of the image tower and its projection (the only tower L_SDS reaches)
    and every LayerNorm; "all": every CLIP weight, logit_scale included."""
    clip.requires_grad_(trainable == "all")
    if trainable == "image":
        clip.vision_model.requires_grad_(True)
        clip.visual_projection.requires_grad_(True)
    for module in (clip.vision_model if image_only else clip).modules():
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
    args: argparse.Namespace  # args.device: this process's device
    rank: int  # this process, of `world` (torchrun; else 0 of 1)
    world: int
    objective: SDSCLIPLoss  # CLIP and h_w: what is trained
    optimizer: torch.optim.Optimizer
    unet: nn.Module  # ε_θ, frozen
    sd_text_encoder: nn.Module  # frozen
    sd_tokenizer: Tokenizer
    tokenizer: Tokenizer  # the fine-tuned CLIP's
    dataset: "CocoCaptions"
    steps_per_epoch: int
    sources: dict  # what the run trains from, by content (`fingerprint`)
    winoground: Winoground | None
    step: int = 0  # optimizer steps done
    saved_step: int | None = None  # the step of the last good checkpoint
    bad_images: list[str] = field(default_factory=list)  # those skipped with --skip_bad_images

    @property
    def last_step(self) -> int:  # where this run stops: --max_steps or the end of --epochs
        total = self.args.epochs * self.steps_per_epoch
        return min(total, self.args.max_steps) if self.args.max_steps else total


def train(run: Run) -> None:
    """nanoGPT's loop, from run.step to run.last_step: data, t and ε, loss, backward, clip, save,
    step, log. A checkpoint holds weights that have given a finite loss and gradient: those after
    step s are saved during step s + 1, once its loss and gradient are known."""
    args, objective, optimizer = run.args, run.objective, run.optimizer
    trainable = [p for p in objective.parameters() if p.requires_grad]
    model = DistributedDataParallel(objective) if dist.is_initialized() else objective
    sampler = DistributedSampler(run.dataset, run.world, run.rank, seed=args.seed, drop_last=True)
    data = batches(run.dataset, sampler, args.batch_size // run.world,
                   run.steps_per_epoch * args.grad_accum, run.step * args.grad_accum, args.num_workers)
    progress = tqdm(total=run.last_step, initial=run.step, disable=run.rank > 0, desc="train")
    if run.step == 0:
        score_winoground(run)  # --winoground: the scores before training
    while run.step < run.last_step:
        step, start = run.step, time.perf_counter()
        lr = learning_rate(step, args, args.epochs * run.steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = torch.zeros(4, device=args.device)  # Σ L, L_CLIP, L_SDS, images
        objective.embed_grad_sq = torch.zeros(2, device=args.device)  # the hooks add this step's
        for micro in range(args.grad_accum):
            # data: images x, a caption y each (drawn per image and epoch), c = SD's text encoder(y)
            pixels, ids, context = get_batch(run, data)
            t, noise = draw_t_and_noise(run, step, micro, len(ids))  # t ~ U{0, …, 999}, ε ~ N(0, I)
            # loss: L = L_CLIP + λ·L_SDS (DDP averages the gradients at the last micro-batch only)
            last_micro = micro == args.grad_accum - 1
            with contextlib.nullcontext() if last_micro or run.world == 1 else model.no_sync():
                with autocast(args.device, args.precision):
                    loss, l_clip, l_sds = model(pixels, ids, context, t, noise, run.unet)
                (loss / args.grad_accum).backward()  # backward: ∇_φ,w L / grad_accum, summed
            totals += torch.tensor([loss.item(), l_clip.item(), l_sds.item(), len(ids)],
                                   device=args.device)
        # clip: the gradient norm to --grad_clip (0: measured only)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or math.inf).item()
        losses, embed_grads, images = step_means(run, totals, objective.embed_grad_sq)
        stop_unless_finite(run, step, losses, grad_norm)
        # save: these weights have just given a finite loss and gradient; every --save_every steps
        if step > 0 and args.save_every and step % args.save_every == 0 and step != run.saved_step:
            save_checkpoint(run)
        # step: AdamW on the LayerNorms and h_w
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stop_unless_finite(run, step)  # the weights and moments the update left
        run.step = step = step + 1
        # log: the progress bar and log.jsonl; Winoground after each epoch and at the end
        log_step(run, progress, losses, lr, grad_norm, embed_grads, images,
                 time.perf_counter() - start)
        if step % run.steps_per_epoch == 0 or step == run.last_step:
            score_winoground(run)
    progress.close()


def step_means(run: Run, totals: torch.Tensor, embed_grad_sq: torch.Tensor) -> tuple:
    """Over the processes: the means of L, L_CLIP, L_SDS; ‖∂L_CLIP/∂f‖, ‖∂(λ·L_SDS)/∂f‖ on the
    step's batch (what each term sends to f_φ(x)); the number of images."""
    totals = all_sum(totals)
    losses = (totals[:3] / (run.world * run.args.grad_accum)).tolist()
    return losses, (all_sum(embed_grad_sq).sqrt() / run.world).tolist(), totals[3]


def get_batch(run: Run, data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next micro-batch on the device: x (B, 3, S, S), y's ids (B, 77), c (B, 77, D_c); fewer
    than the local batch where --skip_bad_images left images out."""
    epoch, (pixels, indices, errors) = next(data)
    run.bad_images += check_images(pixels, errors, run.args.skip_bad_images, run.args.device)
    captions = [run.dataset.caption(i, epoch) for i in indices]
    with torch.no_grad(), autocast(run.args.device, run.args.precision):
        context = encode_prompt(run.sd_text_encoder, run.sd_tokenizer, captions)
    return pixels.to(run.args.device), run.tokenizer(captions).to(run.args.device), context


def draw_t_and_noise(run: Run, step: int, micro: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ U{0, …, 999} (n,) and ε ~ N(0, I) (n, 4, h, w) for this process's n images: drawn for
    the global batch by `step_generator`, of which process r of W takes rows r, r+W, …, as it
    takes the images. A resumed run and every process of a split one draw one run's numbers."""
    generator, batch = step_generator(run.args.seed, step, micro), run.args.batch_size
    rows = slice(run.rank, run.rank + n * run.world, run.world)
    t = run.objective.schedule.sample_timesteps(batch, generator)[rows]
    noise = torch.randn(batch, *run.objective.mapper.latent_shape, generator=generator)[rows]
    return t.to(run.args.device), noise.to(run.args.device)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of t and ε for one batch: a function of (seed, step, micro-batch) alone.
    (Every draw is seeded so, or by (seed, epoch, index) for the captions: the global RNG seeds
    only h_w's init, so a checkpoint need not hold any RNG state.)"""
    seed = np.random.SeedSequence([seed, step, micro]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def stop_unless_finite(run: Run, step: int, losses: list | None = None, grad_norm: float = 0.0):
    """The run's guards, in one place: before the save and the update, the loss (the mean over the
    processes and micro-batches) and the gradient norm; after the update (no `losses`), the weights
    and AdamW moments it left. One that is not finite stops every process (all see the same
    numbers), naming the last good checkpoint."""
    what = None
    if losses is None:
        if bad := nonfinite(trained_state(run.objective, run.optimizer)):
            what = f"AdamW's update at step {step} left {len(bad)} non-finite tensor(s): "
            what += ", ".join(bad[:3])
    elif not math.isfinite(losses[0]):
        what = "the loss is {} at step {} (clip {}, sds {})".format(losses[0], step, *losses[1:])
    elif not math.isfinite(grad_norm):
        what = f"the gradient norm is {grad_norm} at step {step}"
    if what:
        path = Path(run.args.out) / CHECKPOINT_FILE
        raise SystemExit(f"train.py: {what}; stopped. " + (
            "No checkpoint was written yet." if run.saved_step is None else
            f"The last good checkpoint, step {run.saved_step}, is kept in {path}: continue with "
            f"--resume (perhaps with a lower --lr or a --grad_clip)"))


def score_winoground(run: Run) -> None:
    """--winoground: the CLIP's text / image / group scores (%), overall and by tag, printed and
    logged by the master process; in eval mode, drawing from no generator that training uses."""
    if run.winoground is None or run.rank > 0:
        return
    clip, data, was_training = run.objective.clip, run.winoground, run.objective.clip.training
    clip.eval()
    try:
        cosines = clip_scores(clip, run.tokenizer, data, data.examples, device=run.args.device)
    except ValueError as err:  # an unreadable image
        raise SystemExit(f"train.py: --winoground: {err}") from None
    clip.train(was_training)
    summary = summarize(score_examples(data.examples, cosines))
    scores = {key: summary["all"][key] for key in ("n", "text", "image", "group")} | {
        "by_tag": {name: row for name, row in summary.items() if name != "all"}}
    epoch = run.step / run.steps_per_epoch
    tqdm.write(f"winoground, step {run.step} (epoch {epoch:g}): text {scores['text']:.2f}  image "
               f"{scores['image']:.2f}  group {scores['group']:.2f}  ({scores['n']} examples)")
    append_log(run, {"step": run.step, "epoch": epoch, "winoground": scores})


# ----------------------------------------------------------------------------- setup and finish


def main(argv=None) -> None:
    args = get_args(argv)
    if args.toy:  # weights/toyworld/ draws the toy world on first use: its files, unless given
        from weights import toyworld  # the toy world only under --toy
        toy = toyworld.build()
        paths = {"clip": "clip", "sd": "sd", "coco_root": "train", "winoground": "test"}
        for name, key in paths.items():
            if getattr(args, name) is None:
                setattr(args, name, str(toy[key]))
    run = setup(args)
    train(run)
    finish(run)


def setup(args: argparse.Namespace) -> Run:
    """Processes and devices; the models, frozen but for what --trainable names and h_w (fitted
    first with --mapper fitted, then frozen too); AdamW; with --resume, the checkpoint's state once
    it is shown to continue this run."""
    rank, world = start_processes(args)
    path, device = Path(args.out) / CHECKPOINT_FILE, torch.device(args.device)
    meta, tensors = read_checkpoint(path, args.resume)  # without --resume: None, {}

    # models: the CLIP to fine-tune, SD's frozen UNet and text encoder, their tokenizers; the data
    (clip_path, sd), (clip, tokenizer), sd_parts, (dataset, winoground) = read_sources(
        args, read_winoground_images=bool(meta) and rank == 0)
    unet, sd_text_encoder, sd_tokenizer = sd_parts
    unet.gradient_checkpointing = args.gradient_checkpointing
    sources = fingerprint(clip_path, sd, Path(args.coco_root), vae=args.mapper == "fitted")
    changes = check_resume(path, meta, args, sources) if meta else {}
    torch.manual_seed(args.seed)  # h_w's initial weights are a function of --seed alone
    mapper = Mapper.for_unet(clip.config.projection_dim, unet).to(device)  # h_w: (B, D) → latents
    if args.mapper == "fitted":  # fitted to SD's latents, then frozen (a resume reads it back)
        mapper.requires_grad_(False)
        if not meta:
            fit_mapper_to_latents(args, clip, mapper, dataset, sd, verbose=rank == 0)

    # freeze everything but what --trainable names (and h_w); the objective, AdamW, the steps
    set_trainable(clip, args.trainable, args.image_layernorms_only)
    objective = SDSCLIPLoss(clip, mapper, args.sds_weight, args.sds_mode)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, args.lr, ADAM_BETAS, weight_decay=args.weight_decay)
    steps_per_epoch = len(dataset) // args.batch_size // args.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"train.py: {len(dataset)} images make no step of {args.batch_size} × "
                         f"{args.grad_accum}")
    batches_per_epoch = steps_per_epoch * args.grad_accum
    step = restore(path, meta, tensors, objective, optimizer, batches_per_epoch) if meta else 0
    run = Run(args, rank, world, objective, optimizer, unet, sd_text_encoder, sd_tokenizer,
              tokenizer, dataset, steps_per_epoch, sources, winoground, step,
              saved_step=step if meta else None)
    if rank == 0:
        start_log(Path(args.out), run.step, changes, args.resume)
        report(run)
    return run


def report(run: Run) -> None:
    """What a user needs to trust the run: what is trained and frozen, the batch, the steps, and
    where things go."""
    args, clip, out = run.args, run.objective.clip, Path(run.args.out)
    n_trained = sum(p.numel() for p in clip.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in clip.parameters() if not p.requires_grad)
    n_mapper = sum(p.numel() for p in run.objective.mapper.parameters())
    n_sd = sum(p.numel() for m in (run.unet, run.sd_text_encoder) for p in m.parameters())
    what = TRAINABLE[args.trainable] + (" (image tower only)" if args.image_layernorms_only else "")
    mapper = (f"+ {n_mapper:,} h_w parameters" if args.mapper == "joint" else
              f"(h_w's {n_mapper:,} parameters fitted, then frozen)")
    print(f"trainable (--trainable {args.trainable}): {n_trained:,} {what} parameters {mapper}; "
          f"frozen: {n_frozen:,} CLIP + {n_sd:,} SD UNet and text encoder")
    print(run.dataset.summary())
    print(f"{len(run.dataset):,} images, batch {args.batch_size} ({run.world} process(es) × "
          f"{args.batch_size // run.world}) × {args.grad_accum} accumulation = "
          f"{args.batch_size * args.grad_accum} per step; {run.steps_per_epoch:,} steps per epoch, "
          f"steps {run.step} → {run.last_step}; sds_mode {args.sds_mode}, λ = {args.sds_weight}")
    print(f"precision {args.precision}: " + (
        "bfloat16 autocast, SD's UNet and text encoder held in bfloat16, the trained parameters "
        "and AdamW's state in float32" if args.precision == "bf16" else "float32 throughout"))
    print(f"checkpoints every {args.save_every} steps: {out / CHECKPOINT_FILE}; "
          f"log: {out / LOG_FILE}")


def finish(run: Run) -> None:
    """The final checkpoint and the export; the skipped images; Winoground before and after."""
    if run.step != run.saved_step:
        save_checkpoint(run)  # the last step's loss was finite, and its update left finite weights
    n_bad = all_sum(torch.tensor([len(run.bad_images)], device=run.args.device))
    if run.rank == 0:
        export(run.objective, run.args)
        print(f"done: step {run.step}; fine-tuned CLIP in {run.args.out} "
              f"(mapper.safetensors holds h_w)")
        if run.args.skip_bad_images:
            print(f"skipped {int(n_bad.item())} missing or unreadable image(s)"
                  + "".join(f"\n  {e}" for e in run.bad_images[:10]))
        print(gradient_summary(Path(run.args.out) / LOG_FILE))
        if run.winoground is not None:
            print(winoground_table(Path(run.args.out) / LOG_FILE))
    if dist.is_initialized():
        dist.destroy_process_group()


def winoground_table(log_file: Path) -> str:
    """The first and the last Winoground scores of log.jsonl: before and after fine-tuning."""
    records = [r for r in map(json.loads, log_file.read_text().splitlines()) if "winoground" in r]
    if not records:
        return "winoground: no scores in log.jsonl"
    rows = {f"before (step {records[0]['step']})": records[0]["winoground"],
            f"after (step {records[-1]['step']})": records[-1]["winoground"]}
    return format_table(rows, "Winoground, CLIP scores (chance 25 / 25 / 16.67)")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--clip", default="weights/clip-vit-base-patch32",
        help="CLIP to fine-tune: Hugging Face folder, or a hub id in the local HF cache")
    add("--sd", default="weights/stable-diffusion-v1-4",
        help="Stable Diffusion 1.x or 2.x-base: diffusers folder, or a hub id in the HF cache")
    add("--coco_root", default="weights/coco", help="MS-COCO 2017: train2017/ and annotations/")
    add("--out", default="out/sds-clip", help="checkpoints, log.jsonl and the final model")
    add("--epochs", type=int, default=5, help="passes over the images (paper: 5)")
    add("--batch_size", type=int, default=32, help="pairs per batch, all processes (paper: 32)")
    add("--grad_accum", type=int, default=1, help="batches per optimizer step")
    add("--lr", type=float, default=5e-5, help="AdamW learning rate (paper: 5e-5)")
    add("--weight_decay", type=float, default=0.0, help="AdamW weight decay (usually 0)")
    add("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up steps")
    add("--cosine", action="store_true", help="cosine decay of the learning rate to 0 by --epochs")
    add("--grad_clip", type=float, default=0.0, help="clip the gradient norm to this (0: never)")
    add("--sds_weight", type=float, default=0.001, help="λ, the SDS loss's weight (paper: 0.001)")
    add("--sds_mode", choices=("full", "stopgrad"), default="full",
        help="full: the paper's loss through the UNet; stopgrad: DreamFusion's SDS gradient")
    add("--trainable", choices=tuple(TRAINABLE), default="layernorm", help="what of CLIP trains: "
        "layernorm (the paper), image (the image tower + every LayerNorm) or all (every weight)")
    add("--image_layernorms_only", action="store_true", help="only the image tower's LayerNorms (and h_w)")
    add("--mapper", choices=("joint", "fitted"), default="joint", help="joint: h_w trained with "
        "CLIP (the paper); fitted: h_w fitted to SD's latents by ridge least squares, then frozen")
    add("--mapper_images", type=int, default=3000, help="--mapper fitted: training images it is "
        "fitted on (1 in 10 held out for its R²; SD's VAE encodes each once)")
    add("--gradient_checkpointing", action="store_true", help="recompute UNet activations in backward")
    add("--max_steps", type=int, default=0, help="stop after N optimizer steps (0: all epochs)")
    add("--limit_images", type=int, default=0, help="use only the first N COCO images (0: all)")
    add("--skip_bad_images", action="store_true", help="skip (and count) unreadable images")
    add("--save_every", type=int, default=1000, help="a checkpoint every N steps (and at the end)")
    add("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    add("--log_every", type=int, default=1, help="one log.jsonl line every N steps")
    add("--num_workers", type=int, default=4, help="data-loading processes per training process")
    add("--seed", type=int, default=0, help="seeds h_w's init, the data order, captions, t and ε")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    add("--precision", choices=PRECISIONS, help="bf16: autocast, SD in bfloat16, trained weights "
        "and AdamW in float32; fp32: float32 throughout (default: bf16 on CUDA, fp32 otherwise)")
    add("--winoground", help="Winoground folder (examples.jsonl + images/): CLIP's scores before "
        "training, after every epoch and at the end, in log.jsonl")
    add("--toy", action="store_true", help="the toy world of weights/toyworld/ (built on first "
        f"use): its models, data, test split and settings are the defaults, --out {TOY_OUT}")
    args = p.parse_args(argv)
    args = toy_settings(p, args, argv) if args.toy else args
    args.precision = args.precision or default_precision(args.device)  # a checkpoint records it
    check_settings(p, args)
    return args


def toy_settings(p: argparse.ArgumentParser, args: argparse.Namespace, argv) -> argparse.Namespace:
    """--toy: the toy world's settings as the defaults; its files (None here) once `main` has
    built it."""
    from weights.toyworld import TRAIN_DEFAULTS  # the toy world only under --toy
    if "RANK" in os.environ:
        p.error("--toy builds its world in one process: start it with `python train.py --toy`, "
                "not torchrun")
    if unknown := sorted(set(TRAIN_DEFAULTS) - set(vars(args))):
        p.error(f"weights/toyworld/recipe.py's TRAIN_DEFAULTS name settings train.py does not have: "
                f"{unknown}")
    p.set_defaults(clip=None, sd=None, coco_root=None, winoground=None, out=TOY_OUT, **TRAIN_DEFAULTS)
    return p.parse_args(argv)  # what the command line says still wins


def check_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse's one-line error for a value no run can use."""
    if not 0 < args.lr <= MAX_LR:  # also false for NaN
        p.error(f"--lr must be a number above 0 and at most {MAX_LR:.3g} (AdamW's first step, "
                f"lr / (1 − β₁), must be a float32); got {args.lr}")
    for name in ("sds_weight", "grad_clip", "weight_decay"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            p.error(f"--{name} must be a finite number, 0 or more; got {getattr(args, name)}")
    if args.lr * args.weight_decay >= 1:
        p.error(f"--lr × --weight_decay must be below 1 (AdamW scales the weights by "
                f"1 − lr·weight_decay each step); got {args.lr} × {args.weight_decay}")
    if args.image_layernorms_only and args.trainable != "layernorm":
        p.error(f"--image_layernorms_only picks among the LayerNorms: it needs --trainable layernorm, "
                f"not {args.trainable}")
    for name in ("epochs", "batch_size", "grad_accum", "warmup_steps", "max_steps", "limit_images",
                 "save_every", "log_every", "num_workers", "seed", "mapper_images"):
        least = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "mapper_images": 20}.get(name, 0)
        if getattr(args, name) < least:
            p.error(f"--{name} must be {least} or more; got {getattr(args, name)}")
    if problem := out_problem(args):  # now, not after the models have loaded
        p.error(problem)


# ----------------------------------------------------------------------------- data


def fit_mapper_to_latents(args, clip: nn.Module, mapper: Mapper, dataset: CocoCaptions, sd: Path,
                          verbose: bool) -> None:
    """--mapper fitted: h_w by ridge least squares (sds.fit_mapper) from the CLIP's image embeddings
    of --mapper_images training images, evenly spaced over the dataset, to their own latents z_0
    (SD's VAE, loaded for this only); one image in ten is held out and reports h_w's R²."""
    device = torch.device(args.device)
    try:
        vae = load_vae(sd / "vae", device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"train.py: --mapper fitted: {err}") from None
    size = mapper.latent_shape[-1] * vae.downsampling_factor  # SD's resolution: 64 × 8 = 512
    to_sd, count = sd_image_transform(size), min(args.mapper_images, len(dataset))
    index = np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(int))
    if len(index) < 2:
        raise SystemExit(f"train.py: --mapper fitted needs at least 2 training images (one held out); "
                         f"{args.coco_root} has {len(dataset)}")
    embeds, latents = [], []
    with torch.no_grad(), autocast(device, args.precision):
        for images in image_chunks(dataset, index, size, verbose):
            pixels = torch.stack([dataset.transform(image) for image in images]).to(device)
            embeds.append(clip.encode_image(pixels).float())  # f_φ(x), (n, D)
            sd_pixels = torch.stack([to_sd(image) for image in images]).to(device)
            latents.append(vae.images_to_latents(sd_pixels).float())  # z_0, (n, C, h, w)
    embeds, latents = torch.cat(embeds), torch.cat(latents)
    held_out = torch.zeros(len(index), dtype=torch.bool)
    held_out[::10] = True  # one in ten
    fit_mapper(mapper, embeds[~held_out], latents[~held_out])
    if verbose:
        print(f"h_w fitted by ridge least squares from CLIP's image embeddings to SD's latents "
              f"(× scaling_factor {vae.config.scaling_factor}) of {int((~held_out).sum()):,} training "
              f"images: R² {r_squared(mapper, embeds[~held_out], latents[~held_out]):.3f} on them, "
              f"{r_squared(mapper, embeds[held_out], latents[held_out]):.3f} on "
              f"{int(held_out.sum()):,} held out; then frozen")


# ----------------------------------------------------------------------------- several processes


def start_processes(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size): torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (args.device becomes this
    process's GPU); otherwise one process. The batch is split evenly between them."""
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"train.py: --batch_size {args.batch_size} is not divisible by {world} "
                         f"processes")
    return rank, world


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the processes, in place."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


if __name__ == "__main__":
    main()

"""Controls, probes and retention for what SDS-CLIP does in the toy world (issue 18; run by hand).

- The positive control: train.py's fine-tuning with λ = 0 (the same LayerNorms, steps, data order,
  captions and schedule), with NegCLIP's hard negatives (Yuksekgonul et al. 2023, "When and why
  vision-language models behave like bags-of-words", https://arxiv.org/abs/2210.01936): each
  caption's swapped captions, which the world's grammar writes, as extra text columns of the
  contrastive logits. The ceiling: the same with every CLIP weight trained. Kept out of train.py: it
  is another loss, not a setting of SDS-CLIP; without negatives it is train.py's λ = 0 control,
  weight for weight (tested).
- The mechanism (probes.py): linear probes on frozen image and text embeddings for a binding
  question (the colour of the left or top object) and a control question that needs no binding
  (which two colours), and a picture of h_w(f_φ(x)) decoded by the toy VAE: what the UNet "sees" of
  CLIP's image embedding.
- Retention (probes.py): the base skill, image→caption R@1 and zero-shot recognition of the objects.

    python -m weights.toyworld.controls finetune --seed 0 --out out/toy-controls/negclip-seed0
    python -m weights.toyworld.controls finetune --all_weights --seed 0 --out out/toy-controls/ceiling-seed0
    python eval_winoground.py --clip out/toy-controls/negclip-seed0 --data weights/toy/data/test
    python -m weights.toyworld.controls probe --clip out/toy-controls/negclip-seed0 --split val
    python -m weights.toyworld.controls retention --clip out/toy-controls/negclip-seed0
    python -m weights.toyworld.controls picture --runs out/toy-evidence/control-seed0 out/toy-evidence/full-seed0 --out hw.png

Settings are chosen on the val split only (--split val); test is for the table.
"""

import argparse
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import train
from clip import Tokenizer, image_transform
from eval_winoground import timestep_grid
from sds import NoiseSchedule, StableDiffusion, denoising_error, encode_prompt
from weights import coco, runs
from weights.networks import hub_path, load_clip, load_stable_diffusion, load_tokenizer

from .probes import binding_probe, hw_picture, read_train, retention
from .recipe import MODELS_DIR, TOY_DIR, TRAIN_DEFAULTS, build, sha256, unsafe_out, write_json
from .world import COLOURS, SHAPES, vae_pixels

# "a red circle", "the blue square": the world's noun phrases
NOUN_PHRASE = re.compile(rf"\b(a|the) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b", re.IGNORECASE)
RUN_FILE = "run.json"  # beside the exported CLIP: the settings, the parameter counts, the losses


# ----------------------------------------------------------------------------- hard negatives (NegCLIP)


def hard_negative(caption: str) -> list[str]:
    """The world's swapped captions of a training caption: [attribute swap, object swap].
    "a red circle left of a blue square" → "a blue circle left of a red square" (the colours swapped
    between the objects), "a blue square left of a red circle" (the noun phrases swapped). Each
    describes another scene, since the two objects of a training scene differ in colour and
    shape."""
    phrases = list(NOUN_PHRASE.finditer(caption))
    if len(phrases) != 2:
        raise ValueError(f"hard_negative: {caption!r} does not name two objects as "
                         f"'(a|the) <colour> <shape>': it is not a caption of the toy world's "
                         f"grammar")
    first, second = phrases

    def rewrite(new_first: str, new_second: str) -> str:
        return (caption[: first.start()] + new_first + caption[first.end(): second.start()]
                + new_second + caption[second.end():])

    (a1, c1, s1), (a2, c2, s2) = first.groups(), second.groups()
    attribute = rewrite(f"{a1} {c2} {s1}", f"{a2} {c1} {s2}")
    objects = rewrite(second.group(), first.group())
    return [attribute, objects]


def negclip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                 negative_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """NegCLIP's contrastive loss: f_φ(x_i) (B, D), their captions g_φ(y_i) (B, D), hard negatives
    g_φ(ỹ_m) (M, D) (K per caption: M = K·B; none: CLIP's loss), logit_scale τ, a log as in the
    checkpoint.

        S = e^τ cos(f, [g; g̃]) ∈ R^{B × (B+M)},   L = ½ [CE_i→t(S, diag) + CE_t→i(S[:, :B]ᵀ, diag)]

    Image → text picks each image's caption among all B + M texts; text → image picks each caption's
    image among the B images only: a hard negative has no image, so it is only ever a wrong
    answer."""
    image = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(torch.cat([text_embeds, negative_embeds]).float(), dim=-1)  # (B + M, D)
    logits = logit_scale.exp() * image @ texts.t()  # S_ij = e^τ cos(f_i, g_j), (B, B + M)
    labels = torch.arange(len(image), device=image.device)
    # −1/B Σ_i log softmax_j(S_ij)_i over B + M columns
    image_to_text = F.cross_entropy(logits, labels)
    # −1/B Σ_j log softmax_i(S_ij)_j
    text_to_image = F.cross_entropy(logits[:, : len(image)].t(), labels)
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------- the teacher's ranking


RANKING_IMAGES = 4000  # training images with a teacher ranking: the first ones, by id
RANKING_TIMESTEPS = 16  # the diffusion score's timestep grid for the ranking (timestep_grid)


@torch.no_grad()
def teacher_errors(sd: StableDiffusion, pixels: torch.Tensor, captions: list[list[str]],
                   timesteps: int, seed: int = 0, batch_size: int = 512) -> torch.Tensor:
    """The small SD's diffusion score of K captions on each of N images, uint8 pixels (N, 3, 32,
    32): (N, K), the mean over `timesteps` grid timesteps of ‖ε_θ(z_t, t, c) − ε‖² / (C·H·W), the
    noise shared by the captions of an image (drawn image after image from `seed`), so that they
    differ in caption only."""
    grid, generator, schedule = (timestep_grid(timesteps), torch.Generator().manual_seed(seed),
                                 NoiseSchedule())
    errors = []
    for chunk in tqdm(range(0, len(pixels), 32), desc="teacher ranking", unit="×32 images"):
        images, texts = pixels[chunk: chunk + 32], captions[chunk: chunk + 32]
        n, k = len(images), len(texts[0])
        latents = sd.vae.images_to_latents(vae_pixels(images))  # z_0, (n, 4, h, w)
        # (n·K, 77, D)
        context = encode_prompt(sd.text_encoder, sd.tokenizer, [c for cs in texts for c in cs])
        # ε per image and t
        noise = torch.randn((n, len(grid), *latents.shape[1:]), generator=generator)
        # every (image, caption, timestep), flattened in that order
        i, c, t = (index.flatten() for index in torch.meshgrid(
            torch.arange(n), torch.arange(k), torch.arange(len(grid)), indexing="ij"))
        error = torch.cat([denoising_error(sd.unet, latents[i[b]], grid[t[b]], noise[i[b], t[b]],
                                           context[i[b] * k + c[b]], schedule)
                           for b in torch.arange(len(i)).split(batch_size)])
        errors.append(error.view(n, k, len(grid)).mean(-1))
    return torch.cat(errors)


def teacher_rankings(paths: dict, count: int = RANKING_IMAGES, timesteps: int = RANKING_TIMESTEPS,
                     seed: int = 0) -> dict:
    """The teacher's scores of each of the first `count` training images (by id) on its first
    caption and that caption's two swaps (hard_negative): {"captions": [[y, attribute swap, object
    swap], …], "errors": [[e_0, e_1, e_2], …]}, computed once per world and models, then read from a
    JSON cache in the world's data folder. Cost: count × 3 × timesteps toy UNet calls (4,000 × 3 ×
    16 = 192,000: about 14 min on one thread). Normalising by the empty prompt's error (as the image
    score is) would subtract the same number from the three captions of an image: the ranking needs
    no such step."""
    unet_sha = sha256(Path(paths["sd"]) / "unet" / "diffusion_pytorch_model.safetensors")
    cache = Path(paths["train"]).parent / f"teacher-ranking-{count}-{timesteps}-{seed}.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("unet_sha256") == unet_sha:
            return cached
    pixels, captions, _ = read_train(Path(paths["train"]), count)
    triples = [[cs[0], *hard_negative(cs[0])] for cs in captions]
    errors = teacher_errors(load_stable_diffusion(paths["sd"]), pixels, triples,
                            timesteps, seed)
    result = {"unet_sha256": unet_sha, "timesteps": timesteps, "seed": seed, "captions": triples,
              "errors": errors.tolist()}
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(cache)
    return result


def fit_temperature(errors: torch.Tensor) -> float:
    """The teacher's temperature T, by temperature scaling (Guo et al. 2017): the T that maximises
    the likelihood of the true caption (column 0) under p_T(c | x) = softmax_c(−e(x, c) / T), on
    training images only. One number; the ranking of the captions of each image stays the teacher's
    own."""
    errors = torch.as_tensor(errors, dtype=torch.float64)
    temperatures = torch.logspace(-5, 1, 601, dtype=torch.float64)  # a fine grid over six decades
    likelihood = torch.stack([F.log_softmax(-errors / t, dim=-1)[:, 0].mean()
                              for t in temperatures])
    return temperatures[likelihood.argmax()].item()


def ranking_loss(image_embeds: torch.Tensor, caption_embeds: torch.Tensor, teacher: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_CLIP), mean over images: f_φ(x_r) (R, D), g_φ of each image's K captions (R,
    K, D), the teacher's p_T(c | x_r) (R, K), logit_scale τ (a log):

        p_CLIP(c | x) = softmax_c(e^τ cos(f_φ(x), g_φ(c))),   L_rank = 1/R Σ_r Σ_c p_T log(p_T / p_CLIP)

    CLIP's logits are its own Winoground scores: the teacher's ranking of a caption and its swaps
    reaches the text tower (g_φ) as well as the image tower."""
    image = F.normalize(image_embeds.float(), dim=-1)
    captions = F.normalize(caption_embeds.float(), dim=-1)
    # e^τ cos(f_r, g_rk), (R, K)
    logits = logit_scale.exp() * torch.einsum("rd,rkd->rk", image, captions)
    return F.kl_div(F.log_softmax(logits, dim=-1), teacher.float(), reduction="batchmean")


# ----------------------------------------------------------------------------- the positive control and the ceiling


def as_flags(settings: dict) -> list[str]:
    """{"lr": 1e-3, "cosine": True} → ["--lr=0.001", "--cosine"]: train.py's command line."""
    return [f"--{key}" if value is True else f"--{key}={value}" for key, value in settings.items()
            if value is not False]


@dataclass
class Finetune:
    """What the fine-tuning loop works with; finetune_setup builds it (train.py's Run, for one
    process and the NegCLIP loss)."""
    args: argparse.Namespace  # train.py's settings (finetune_args)
    device: torch.device
    source: Path  # the CLIP fine-tuned: its tokenizer files go beside the export
    clip: torch.nn.Module
    tokenizer: Tokenizer
    dataset: coco.CocoCaptions
    trainable: list  # the parameters AdamW updates
    optimizer: torch.optim.Optimizer
    data: Iterator  # (epoch, (pixels, indices, errors)) per step: train.py's data order
    steps_per_epoch: int
    autocast: torch.autocast
    all_weights: bool  # the ceiling: every CLIP weight trained
    hard_negatives: bool
    ranking: dict | None  # teacher_rankings, or None
    ranking_weight: float  # β
    temperature: float | None = None  # the teacher's (fit_temperature), with a ranking
    teacher: torch.Tensor | None = None  # p_T(c | x), (count, 3), with a ranking

    @property
    def total_steps(self) -> int:  # the steps of --epochs, which the learning rate schedule spans
        return self.args.epochs * self.steps_per_epoch

    @property
    def last_step(self) -> int:  # where the run stops: --max_steps or the end of --epochs
        total, most = self.total_steps, self.args.max_steps
        return min(total, most) if most else total


def finetune_hard_negatives(clip_dir, coco_root, out_dir, seed: int = 0, all_weights: bool = False,
                            epochs: int | None = None, batch_size: int | None = None,
                            lr: float | None = None, max_steps: int = 0, flags: list[str] = (),
                            hard_negatives: bool = True,
                            ranking: dict | None = None, ranking_weight: float = 1.0) -> Path:
    """The positive control (LayerNorms) or the ceiling (all_weights: every CLIP weight), written to
    out_dir as a CLIP folder that eval_winoground.py scores, with run.json. The settings are
    train.py's parser's: its defaults, then weights/toyworld/recipe.py's TRAIN_DEFAULTS (as
    `train.py --toy`), then epochs, batch_size, lr (None: those), then `flags` (train.py's own, e.g.
    ["--cosine", "--warmup_steps=20"]); λ plays no part. Everything but the loss is train.py's:
    freezing, AdamW, learning_rate, CocoCaptions, the data order and the caption drawn per image and
    epoch (functions of the seed), the export. Without hard_negatives it is train.py's λ = 0
    control. With `ranking` (teacher_rankings: the teacher's scores of the first training images'
    captions and their swaps) the loss adds ranking_weight · L_rank (ranking_loss) over the rows of
    each batch that have a ranking, the teacher's distribution at the temperature fit_temperature
    finds."""
    args = finetune_args(clip_dir, coco_root, out_dir, seed, epochs, batch_size, lr, max_steps,
                         flags)
    run = finetune_setup(args, all_weights, hard_negatives, ranking, ranking_weight)
    if ranking:
        run.temperature, run.teacher = teacher_targets(ranking, run.dataset, args.coco_root)
    finetune_report(run)
    start = time.perf_counter()
    losses = finetune_loop(run)
    out = finetune_export(run, losses, start)
    if losses:
        print(f"done: {len(losses)} steps, loss {losses[0]:.4f} → {losses[-1]:.4f}; "
              f"fine-tuned CLIP in {out}")
    return out


def finetune_args(clip_dir, coco_root, out_dir, seed: int, epochs: int | None,
                  batch_size: int | None, lr: float | None, max_steps: int,
                  flags: list[str]) -> argparse.Namespace:
    """train.py's parser's settings: its defaults, then TRAIN_DEFAULTS, then epochs, batch_size, lr
    where given, then `flags`; λ = 0."""
    chosen = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    settings = {**TRAIN_DEFAULTS, "sds_weight": 0.0,
                **{k: v for k, v in chosen.items() if v is not None}}
    args = train.get_args(["--clip", str(clip_dir), "--coco_root", str(coco_root), "--out",
                           str(out_dir), "--seed", str(seed), "--max_steps", str(max_steps),
                           *as_flags(settings), *flags])
    if args.grad_accum != 1:
        raise SystemExit("weights.toyworld.controls: --grad_accum must be 1 here "
                         "(the toy batches fit in memory)")
    return args


def finetune_setup(args: argparse.Namespace, all_weights: bool, hard_negatives: bool,
                   ranking: dict | None, ranking_weight: float) -> Finetune:
    """train.py's setup for one process: the CLIP, its tokenizer and the captions; what is trained
    and AdamW; the data order and length."""
    device, source = torch.device(args.device), hub_path(args.clip)
    try:
        clip, tokenizer = load_clip(source, device), load_tokenizer(source)
        size = clip.config.vision.image_size
        dataset = coco.CocoCaptions(args.coco_root, image_transform(size), args.limit_images,
                                     args.seed, size)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"weights.toyworld.controls: {err}") from None

    # what is trained: train.py's --trainable (LayerNorms by default) or, for the ceiling, every
    # weight
    train.set_trainable(clip, "all" if all_weights else args.trainable, args.image_layernorms_only)
    trainable = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=train.ADAM_BETAS,
                                  weight_decay=args.weight_decay)

    # data order and length, as train.py with one process
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=args.seed,
                                 drop_last=True)
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"weights.toyworld.controls: {len(dataset):,} images make no batch of "
                         f"{args.batch_size}")
    data = coco.batches(dataset, sampler, args.batch_size, steps_per_epoch, 0, args.num_workers)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    return Finetune(args, device, source, clip, tokenizer, dataset, trainable, optimizer, data,
                    steps_per_epoch, autocast, all_weights, hard_negatives, ranking, ranking_weight)


def teacher_targets(ranking: dict, dataset: coco.CocoCaptions,
                    coco_root) -> tuple[float, torch.Tensor]:
    """The teacher's temperature (fit_temperature) and its p_T(c | x) (count, 3) over each ranked
    image's caption and two swaps, once the ranking is shown to be of the first training images
    (its cache is named by count, timesteps and seed, not by the images)."""
    if ([cs[0] for cs in ranking["captions"]]
            != [cs[0] for cs in dataset.captions[: len(ranking["captions"])]]):
        raise SystemExit(f"weights.toyworld.controls: the teacher's ranking was computed on "
                         f"other images than the first {len(ranking['captions']):,} of "
                         f"{coco_root}: delete its cache and rerun")
    diffusion = torch.tensor(ranking["errors"], dtype=torch.float64)
    temperature = fit_temperature(diffusion)
    teacher = F.softmax(-diffusion / temperature, dim=-1).float()  # p_T(c | x), (count, 3)
    return temperature, teacher


def finetune_report(run: Finetune) -> None:
    """What a user needs to trust the run: what is trained and frozen, the negatives or the
    teacher's ranking, the batch, the steps, where the CLIP goes."""
    args = run.args
    what = train.TRAINABLE["all" if run.all_weights else args.trainable]
    negatives = ("2 hard negatives per caption (attribute and object swap)" if run.hard_negatives
                 else "no hard negatives")
    if run.ranking:
        right = 100 * (run.teacher.argmax(-1) == 0).double().mean().item()
        negatives += (f"; the teacher's ranking of {len(run.teacher):,} images' caption and its 2 "
                      f"swaps, temperature {run.temperature:.3g} (its top caption the true one on "
                      f"{right:.1f} %), weight {run.ranking_weight}")
    print(f"trainable: {n_parameters(run.clip, True):,} {what} parameters; frozen: "
          f"{n_parameters(run.clip, False):,}; {negatives}")
    print(f"{len(run.dataset):,} images, batch {args.batch_size}, {run.steps_per_epoch:,} steps "
          f"per epoch, steps 0 → {run.last_step}; AdamW lr {args.lr}, warm-up "
          f"{args.warmup_steps}, cosine {args.cosine}; out {args.out}")


def n_parameters(clip: torch.nn.Module, trained: bool) -> int:
    """The number of CLIP's parameters that are trained (or, trained=False, frozen)."""
    return sum(p.numel() for p in clip.parameters() if p.requires_grad == trained)


def finetune_loop(run: Finetune) -> list[float]:
    """train.py's loop for one process, with batch_loss's loss: the learning rate, a batch and its
    captions, the loss, backward, the gradient clipped to --grad_clip, AdamW. Returns the losses."""
    args, losses = run.args, []
    desc = "ranking" if run.ranking else "hard negatives" if run.hard_negatives else "control"
    for step in tqdm(range(run.last_step), desc=desc, unit="step"):
        for group in run.optimizer.param_groups:
            group["lr"] = train.learning_rate(step, args, run.total_steps)
        epoch, (pixels, indices, errors) = next(run.data)
        coco.check_images(pixels, errors, args.skip_bad_images, run.device)
        captions = [run.dataset.caption(i, epoch) for i in indices]
        loss = batch_loss(run, pixels, captions, indices)
        if not torch.isfinite(loss):
            raise SystemExit(f"weights.toyworld.controls: the loss is {loss.item()} at step "
                             f"{step}; try a lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.trainable, args.grad_clip or math.inf)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def batch_loss(run: Finetune, pixels: torch.Tensor, captions: list[str],
               indices: list[int]) -> torch.Tensor:
    """One batch's loss: NegCLIP's over the captions and their swaps (without hard negatives,
    CLIP's), plus β · L_rank on the rows whose image has a teacher ranking."""
    swapped = [n for caption in captions
               for n in hard_negative(caption)] if run.hard_negatives else []
    ranked = [(row, i) for row, i in enumerate(indices) if run.ranking
              and i < len(run.ranking["captions"])]
    triples = [c for _, i in ranked for c in run.ranking["captions"][i]]
    clip, device = run.clip, run.device
    with run.autocast:
        image_embeds = clip.encode_image(pixels.to(device))  # f_φ(x), (B, D)
        # (B + 2B + 3R, D)
        text_embeds = clip.encode_text(run.tokenizer(captions + swapped + triples).to(device))
        n_texts = len(captions) + len(swapped)
        loss = negclip_loss(image_embeds, text_embeds[: len(captions)],
                            text_embeds[len(captions): n_texts], clip.logit_scale)
        if ranked:  # + β · KL(p_T ‖ p_CLIP) on the rows with a teacher ranking
            rows, images = (torch.tensor(x) for x in zip(*ranked))
            loss = loss + run.ranking_weight * ranking_loss(
                image_embeds[rows.to(device)], text_embeds[n_texts:].view(len(ranked), 3, -1),
                run.teacher[images].to(device), clip.logit_scale)
    return loss


def finetune_export(run: Finetune, losses: list[float], start: float) -> Path:
    """The fine-tuned CLIP as train.py exports it (a CLIP folder with the source's tokenizer files)
    and run.json beside it: the settings, the parameter counts, the losses, the seconds since
    `start`."""
    out = Path(run.args.out)
    runs.save_clip_folder(run.clip, run.source, out)  # as train.py's export
    ranking = run.ranking
    record = {"settings": vars(run.args), "all_weights": run.all_weights,
              "hard_negatives": run.hard_negatives,
              "ranking": ({"images": len(ranking["captions"]), "timesteps": ranking["timesteps"],
                           "temperature": run.temperature, "weight": run.ranking_weight}
                          if ranking else None),
              "trainable": n_parameters(run.clip, True), "frozen": n_parameters(run.clip, False),
              "losses": losses, "seconds": round(time.perf_counter() - start, 1)}
    write_json(out / RUN_FILE, record)
    return out


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> None:
    p = get_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    paths = build(Path(args.world), quick=args.quick, models=Path(args.models))

    if args.command == "finetune":
        ranking = teacher_rankings(paths, args.ranking_images,
                                   args.ranking_timesteps) if args.ranking else None
        finetune_hard_negatives(args.clip or paths["clip"], paths["train"], args.out, args.seed,
                                args.all_weights, max_steps=args.max_steps,
                                flags=args.train_flags.split(),
                                hard_negatives=not args.ranking, ranking=ranking,
                                ranking_weight=args.ranking_weight)
        print(f"score it: python eval_winoground.py --clip {args.out} --data {paths['test']}")
    elif args.command == "probe":
        r = binding_probe(args.clip or paths["clip"], paths, args.split)
        print(f"probe ({args.split}): first colour: image {r['first colour, image']:.1f}, text "
              f"{r['first colour, text']:.1f} (chance {r['first colour, chance']:.1f}, from the "
              f"colours alone {r['first colour, from the colours alone']:.1f}); colour pair: image "
              f"{r['colour pair, image']:.1f}, text {r['colour pair, text']:.1f} "
              f"(chance {r['colour pair, chance']:.1f})")
    elif args.command == "retention":
        r = retention(args.clip or paths["clip"], paths, args.split)
        print(f"retention ({args.split}): " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    else:
        names = args.names or [Path(run).name for run in args.runs]
        if len(names) != len(args.runs):
            p.error(f"--names gives {len(names)} titles for {len(args.runs)} --runs")
        hw_picture(dict(zip(names, map(Path, args.runs))), paths, args.out, args.count)
        print(f"wrote {args.out}: the real images, then h_w(f_φ(x)) decoded by the VAE for "
              + ", ".join(names))


def get_parser() -> argparse.ArgumentParser:
    """The command line: finetune, probe, retention and picture, each with the world's options."""
    world = argparse.ArgumentParser(add_help=False)
    world.add_argument("--world", default=str(TOY_DIR),
                       help="the toy world's data folder (drawn there if missing)")
    world.add_argument("--models", default=str(MODELS_DIR),
                       help="the toy world's models (default: the shipped ones)")
    world.add_argument("--quick", action="store_true",
                       help="a --quick world in --world (a check, not evidence)")
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    add_finetune_parser(commands, world)
    for name, help_ in (("probe", "linear probes on the frozen embeddings"),
                        ("retention", "the base skill")):
        c = commands.add_parser(name, parents=[world], help=help_)
        c.add_argument("--clip", help="a CLIP folder (default: the world's pre-trained CLIP)")
        c.add_argument("--split", choices=("val", "test", "new_objects"), default="test",
                       help="the split to test on")
    c = commands.add_parser("picture", parents=[world],
                            help="h_w(f_φ(x)) decoded by the VAE, per run")
    c.add_argument("--runs", nargs="+", required=True,
                   help="train.py output folders (with mapper.safetensors)")
    c.add_argument("--names", nargs="+", help="a column title per run (default: the folder names)")
    c.add_argument("--out", required=True, help="the PNG to write")
    c.add_argument("--count", type=int, default=6, help="test images")
    return p


def add_finetune_parser(commands, world: argparse.ArgumentParser) -> None:
    """The finetune command's options: the run's, then the teacher's ranking's."""
    f = commands.add_parser("finetune", parents=[world],
                            help="the positive control (or --all_weights: the ceiling)")
    f.add_argument("--out", required=True, help="the fine-tuned CLIP's folder")
    f.add_argument("--seed", type=int, default=0,
                   help="data order and captions (train.py's --seed)")
    f.add_argument("--all_weights", action="store_true",
                   help="train every CLIP weight (the ceiling)")
    f.add_argument("--clip", help="the CLIP to fine-tune (default: the world's)")
    f.add_argument("--max_steps", type=int, default=0,
                   help="stop after this many steps (0: all epochs)")
    f.add_argument("--train_flags", default="",
                   help="more train.py flags, e.g. '--epochs 5 --cosine'")
    f.add_argument("--ranking", action="store_true",
                   help="no hard negatives: distil the teacher's ranking of "
                   "each caption and its swaps instead (computed once per world, then cached)")
    f.add_argument("--ranking_weight", type=float, default=1.0, help="β, the ranking loss's weight")
    f.add_argument("--ranking_images", type=int, default=RANKING_IMAGES,
                   help="training images ranked")
    f.add_argument("--ranking_timesteps", type=int, default=RANKING_TIMESTEPS,
                   help="diffusion timesteps per pair")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The settings that argparse cannot check alone, each a p.error that names the flag."""
    clip = getattr(args, "clip", None)
    if clip:
        try:
            found = hub_path(clip).is_dir()
        except (FileNotFoundError, ValueError):
            found = False
        if not found:
            p.error(f"--clip {clip}: no such CLIP folder (a folder with config.json and "
                    f"model.safetensors, e.g. a train.py --out)")
    out = getattr(args, "out", None)
    if out and (reason := unsafe_out(out)):
        p.error(f"--out {out} {reason}")
    if args.command == "picture" and args.count < 1:
        p.error(f"--count must be 1 or more; got {args.count}")
    if args.command == "finetune" and args.max_steps < 0:
        p.error(f"--max_steps must be 0 (all epochs) or more; got {args.max_steps}")
    if args.quick and Path(args.world) == TOY_DIR:
        p.error(f"--quick needs its own --world folder: {TOY_DIR} holds the full world")
    if args.command == "finetune" and not (math.isfinite(args.ranking_weight)
                                           and args.ranking_weight >= 0):
        p.error(f"--ranking_weight must be a finite number, 0 or more; got {args.ranking_weight}")
    if args.command == "finetune" and not (args.ranking_images >= 1
                                           and 1 <= args.ranking_timesteps <= 1000):
        p.error(f"--ranking_images must be 1 or more and --ranking_timesteps between 1 and 1000; "
                f"got {args.ranking_images} and {args.ranking_timesteps}")


if __name__ == "__main__":
    main()

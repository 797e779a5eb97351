"""Controls, probes and retention for what SDS-CLIP does in the toy world (issue 18; run by hand).

- The positive control: train.py's fine-tuning with λ = 0 (the same LayerNorms, steps, data order,
  captions and schedule), with NegCLIP's hard negatives (Yuksekgonul et al. 2023, "When and why
  vision-language models behave like bags-of-words", https://arxiv.org/abs/2210.01936): each caption's
  swapped captions, which the world's grammar writes, as extra text columns of the contrastive logits.
  The ceiling: the same with every CLIP weight trained. Kept out of train.py: it is another loss, not
  a setting of SDS-CLIP; without negatives it is train.py's λ = 0 control, weight for weight (tested).
- The mechanism: linear probes on frozen image and text embeddings for a binding question (the colour
  of the left or top object) and a control question that needs no binding (which two colours), and a
  picture of h_w(f_φ(x)) decoded by the toy VAE: what the UNet "sees" of CLIP's image embedding.
- Retention: the base skill, image→caption R@1 and zero-shot recognition of the objects.

    python tests/toy_controls.py finetune --seed 0 --out out/toy-controls/negclip-seed0
    python tests/toy_controls.py finetune --all_weights --seed 0 --out out/toy-controls/ceiling-seed0
    python eval_winoground.py --clip out/toy-controls/negclip-seed0 --data weights/toy/data/test
    python tests/toy_controls.py probe --clip out/toy-controls/negclip-seed0 --split val
    python tests/toy_controls.py retention --clip out/toy-controls/negclip-seed0
    python tests/toy_controls.py picture --runs out/toy-evidence/control-seed0 out/toy-evidence/full-seed0 --out hw.png

Settings are chosen on the val split only (--split val); test is for the table.
"""

import argparse
import itertools
import json
import math
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the project's modules sit one folder up
    sys.path.insert(0, str(REPO))
import train  # noqa: E402
from clip import Tokenizer, hub_path, image_transform, load_clip, save_clip  # noqa: E402
from eval_winoground import StableDiffusion, timestep_grid  # noqa: E402
from sds import Mapper, NoiseSchedule, denoising_error, encode_prompt  # noqa: E402
from vae import load_vae  # noqa: E402
from weights.toyworld import COLOURS, MODELS_DIR, SHAPES, TOY_DIR, TRAIN_DEFAULTS, build, caption_recall  # noqa: E402
from weights.toyworld import as_pixels, clip_pixels, read_split, sha256, sheet, to_pil, vae_pixels  # noqa: E402

# "a red circle", "the blue square": the world's noun phrases
NOUN_PHRASE = re.compile(rf"\b(a|the) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b", re.IGNORECASE)
OBJECTS = [(colour, shape) for colour in COLOURS for shape in SHAPES]  # all of them, the never-trained ones too
COLOUR_PAIRS = [frozenset(pair) for pair in itertools.combinations(COLOURS, 2)]
RUN_FILE = "run.json"  # beside the exported CLIP: the settings, the parameter counts, the losses


# ----------------------------------------------------------------------------- hard negatives (NegCLIP)


def hard_negative(caption: str) -> list[str]:
    """The world's swapped captions of a training caption: [attribute swap, object swap].
    "a red circle left of a blue square" → "a blue circle left of a red square" (the colours swapped
    between the objects), "a blue square left of a red circle" (the noun phrases swapped). Each
    describes another scene, since the two objects of a training scene differ in colour and shape."""
    phrases = list(NOUN_PHRASE.finditer(caption))
    if len(phrases) != 2:
        raise ValueError(f"hard_negative: {caption!r} does not name two objects as '(a|the) <colour> <shape>': "
                         f"it is not a caption of the toy world's grammar")
    first, second = phrases

    def rewrite(new_first: str, new_second: str) -> str:
        return (caption[: first.start()] + new_first + caption[first.end(): second.start()] + new_second
                + caption[second.end():])

    (a1, c1, s1), (a2, c2, s2) = first.groups(), second.groups()
    attribute = rewrite(f"{a1} {c2} {s1}", f"{a2} {c1} {s2}")
    objects = rewrite(second.group(), first.group())
    return [attribute, objects]


def negclip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """NegCLIP's contrastive loss: f_φ(x_i) (B, D), their captions g_φ(y_i) (B, D), hard negatives g_φ(ỹ_m)
    (M, D) (K per caption: M = K·B; none: CLIP's loss), logit_scale τ, a log as in the checkpoint.

        S = e^τ cos(f, [g; g̃]) ∈ R^{B × (B+M)},   L = ½ [CE_i→t(S, diag) + CE_t→i(S[:, :B]ᵀ, diag)]

    Image → text picks each image's caption among all B + M texts; text → image picks each caption's
    image among the B images only: a hard negative has no image, so it is only ever a wrong answer."""
    image = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(torch.cat([text_embeds, negative_embeds]).float(), dim=-1)  # (B + M, D)
    logits = logit_scale.exp() * image @ texts.t()  # S_ij = e^τ cos(f_i, g_j), (B, B + M)
    labels = torch.arange(len(image), device=image.device)
    image_to_text = F.cross_entropy(logits, labels)  # −1/B Σ_i log softmax_j(S_ij)_i over B + M columns
    text_to_image = F.cross_entropy(logits[:, : len(image)].t(), labels)  # −1/B Σ_j log softmax_i(S_ij)_j
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------- the teacher's ranking


RANKING_IMAGES = 4000  # training images with a teacher ranking: the first ones, by id
RANKING_TIMESTEPS = 16  # the diffusion score's timestep grid for the ranking (timestep_grid)


@torch.no_grad()
def teacher_errors(sd: StableDiffusion, pixels: torch.Tensor, captions: list[list[str]], timesteps: int,
                   seed: int = 0, batch_size: int = 512) -> torch.Tensor:
    """The small SD's diffusion score of K captions on each of N images, uint8 pixels (N, 3, 32, 32):
    (N, K), the mean over `timesteps` grid timesteps of ‖ε_θ(z_t, t, c) − ε‖² / (C·H·W), the noise shared
    by the captions of an image (drawn image after image from `seed`), so that they differ in caption only."""
    grid, generator, schedule = timestep_grid(timesteps), torch.Generator().manual_seed(seed), NoiseSchedule()
    errors = []
    for chunk in tqdm(range(0, len(pixels), 32), desc="teacher ranking", unit="×32 images"):
        images, texts = pixels[chunk: chunk + 32], captions[chunk: chunk + 32]
        n, k = len(images), len(texts[0])
        latents = sd.vae.images_to_latents(vae_pixels(images))  # z_0, (n, 4, h, w)
        context = encode_prompt(sd.text_encoder, sd.tokenizer, [c for cs in texts for c in cs])  # (n·K, 77, D)
        noise = torch.randn((n, len(grid), *latents.shape[1:]), generator=generator)  # ε per image and t
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
    """The teacher's scores of each of the first `count` training images (by id) on its first caption
    and that caption's two swaps (hard_negative): {"captions": [[y, attribute swap, object swap], …],
    "errors": [[e_0, e_1, e_2], …]}, computed once per world and models, then read from a JSON cache in
    the world's data folder. Cost: count × 3 × timesteps toy UNet calls (4,000 × 3 × 16 = 192,000:
    about 14 min on one thread). Normalising by the empty prompt's error (as the image score is) would
    subtract the same number from the three captions of an image: the ranking needs no such step."""
    unet_sha = sha256(Path(paths["sd"]) / "unet" / "diffusion_pytorch_model.safetensors")
    cache = Path(paths["train"]).parent / f"teacher-ranking-{count}-{timesteps}-{seed}.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("unet_sha256") == unet_sha:
            return cached
    pixels, captions, _ = read_train(Path(paths["train"]), count)
    triples = [[cs[0], *hard_negative(cs[0])] for cs in captions]
    errors = teacher_errors(StableDiffusion.from_pretrained(paths["sd"]), pixels, triples, timesteps, seed)
    result = {"unet_sha256": unet_sha, "timesteps": timesteps, "seed": seed, "captions": triples,
              "errors": errors.tolist()}
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(cache)
    return result


def fit_temperature(errors: torch.Tensor) -> float:
    """The teacher's temperature T, by temperature scaling (Guo et al. 2017): the T that maximises the
    likelihood of the true caption (column 0) under p_T(c | x) = softmax_c(−e(x, c) / T), on training images
    only. One number; the ranking of the captions of each image stays the teacher's own."""
    errors = torch.as_tensor(errors, dtype=torch.float64)
    temperatures = torch.logspace(-5, 1, 601, dtype=torch.float64)  # a fine grid over six decades
    likelihood = torch.stack([F.log_softmax(-errors / t, dim=-1)[:, 0].mean() for t in temperatures])
    return temperatures[likelihood.argmax()].item()


def ranking_loss(image_embeds: torch.Tensor, caption_embeds: torch.Tensor, teacher: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_CLIP), mean over images: f_φ(x_r) (R, D), g_φ of each image's K captions (R, K, D),
    the teacher's p_T(c | x_r) (R, K), logit_scale τ (a log):

        p_CLIP(c | x) = softmax_c(e^τ cos(f_φ(x), g_φ(c))),   L_rank = 1/R Σ_r Σ_c p_T log(p_T / p_CLIP)

    CLIP's logits are its own Winoground scores: the teacher's ranking of a caption and its swaps reaches the
    text tower (g_φ) as well as the image tower."""
    image = F.normalize(image_embeds.float(), dim=-1)
    captions = F.normalize(caption_embeds.float(), dim=-1)
    logits = logit_scale.exp() * torch.einsum("rd,rkd->rk", image, captions)  # e^τ cos(f_r, g_rk), (R, K)
    return F.kl_div(F.log_softmax(logits, dim=-1), teacher.float(), reduction="batchmean")


# ----------------------------------------------------------------------------- the positive control and the ceiling


def as_flags(settings: dict) -> list[str]:
    """{"lr": 1e-3, "cosine": True} → ["--lr=0.001", "--cosine"]: train.py's command line."""
    return [f"--{key}" if value is True else f"--{key}={value}" for key, value in settings.items()
            if value is not False]


def finetune_hard_negatives(clip_dir, coco_root, out_dir, seed: int = 0, all_weights: bool = False,
                            epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                            max_steps: int = 0, flags: list[str] = (), hard_negatives: bool = True,
                            ranking: dict | None = None, ranking_weight: float = 1.0) -> Path:
    """The positive control (LayerNorms) or the ceiling (all_weights: every CLIP weight), written to out_dir
    as a CLIP folder that eval_winoground.py scores, with run.json. The settings are train.py's parser's:
    its defaults, then weights/toyworld.py's TRAIN_DEFAULTS (as `train.py --toy`), then epochs, batch_size,
    lr (None: those), then `flags` (train.py's own, e.g. ["--cosine", "--warmup_steps=20"]); λ plays no part.
    Everything but the loss is train.py's: freezing, AdamW, learning_rate, CocoCaptions, the data order and
    the caption drawn per image and epoch (functions of the seed), the export. Without hard_negatives it is
    train.py's λ = 0 control. With `ranking` (teacher_rankings: the teacher's scores of the first training
    images' captions and their swaps) the loss adds ranking_weight · L_rank (ranking_loss) over the rows of
    each batch that have a ranking, the teacher's distribution at the temperature fit_temperature finds."""
    chosen = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    settings = {**TRAIN_DEFAULTS, "sds_weight": 0.0, **{k: v for k, v in chosen.items() if v is not None}}
    args = train.get_args(["--clip", str(clip_dir), "--coco_root", str(coco_root), "--out", str(out_dir),
                           "--seed", str(seed), "--max_steps", str(max_steps), *as_flags(settings), *flags])
    if args.grad_accum != 1:
        raise SystemExit("toy_controls.py: --grad_accum must be 1 here (the toy batches fit in memory)")
    device, source = torch.device(args.device), hub_path(args.clip)
    try:
        clip, tokenizer = load_clip(source, device), Tokenizer.from_pretrained(source)
        size = clip.config.vision.image_size
        dataset = train.CocoCaptions(args.coco_root, image_transform(size), args.limit_images, args.seed, size)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"toy_controls.py: {err}") from None

    # what is trained: train.py's --trainable (LayerNorms by default) or, for the ceiling, every weight
    train.set_trainable(clip, "all" if all_weights else args.trainable, args.image_layernorms_only)
    trainable = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=train.ADAM_BETAS, weight_decay=args.weight_decay)

    # data order and length, as train.py with one process
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"toy_controls.py: {len(dataset):,} images make no batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    data = train.batches(dataset, sampler, args.batch_size, steps_per_epoch, 0, args.num_workers)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    n_trainable = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in clip.parameters() if not p.requires_grad)
    what = train.TRAINABLE["all" if all_weights else args.trainable]
    negatives = "2 hard negatives per caption (attribute and object swap)" if hard_negatives else "no hard negatives"
    if ranking:
        if [cs[0] for cs in ranking["captions"]] != [cs[0] for cs in dataset.captions[: len(ranking["captions"])]]:
            raise SystemExit(f"toy_controls.py: the teacher's ranking was computed on other images than the first "
                             f"{len(ranking['captions']):,} of {args.coco_root}: delete its cache and rerun")
        diffusion = torch.tensor(ranking["errors"], dtype=torch.float64)
        temperature = fit_temperature(diffusion)
        teacher = F.softmax(-diffusion / temperature, dim=-1).float()  # p_T(c | x), (count, 3)
        right = 100 * (teacher.argmax(-1) == 0).double().mean().item()
        negatives += (f"; the teacher's ranking of {len(teacher):,} images' caption and its 2 swaps, temperature "
                      f"{temperature:.3g} (its top caption the true one on {right:.1f} %), weight {ranking_weight}")
    print(f"trainable: {n_trainable:,} {what} parameters; frozen: {n_frozen:,}; {negatives}")
    print(f"{len(dataset):,} images, batch {args.batch_size}, {steps_per_epoch:,} steps per epoch, steps 0 → "
          f"{last_step}; AdamW lr {args.lr}, warm-up {args.warmup_steps}, cosine {args.cosine}; out {out_dir}")

    losses, start = [], time.perf_counter()
    desc = "ranking" if ranking else "hard negatives" if hard_negatives else "control"
    for step in tqdm(range(last_step), desc=desc, unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(step, args, total_steps)
        epoch, (pixels, indices, errors) = next(data)
        train.check_images(pixels, errors, args.skip_bad_images, device)
        captions = [dataset.caption(i, epoch) for i in indices]
        swapped = [n for caption in captions for n in hard_negative(caption)] if hard_negatives else []
        ranked = [(row, i) for row, i in enumerate(indices) if ranking and i < len(ranking["captions"])]
        triples = [c for _, i in ranked for c in ranking["captions"][i]]
        with autocast:
            image_embeds = clip.encode_image(pixels.to(device))  # f_φ(x), (B, D)
            text_embeds = clip.encode_text(tokenizer(captions + swapped + triples).to(device))  # (B + 2B + 3R, D)
            n_texts = len(captions) + len(swapped)
            loss = negclip_loss(image_embeds, text_embeds[: len(captions)], text_embeds[len(captions): n_texts],
                                clip.logit_scale)
            if ranked:  # + β · KL(p_T ‖ p_CLIP) on the rows with a teacher ranking
                rows, images = (torch.tensor(x) for x in zip(*ranked))
                loss = loss + ranking_weight * ranking_loss(
                    image_embeds[rows.to(device)], text_embeds[n_texts:].view(len(ranked), 3, -1),
                    teacher[images].to(device), clip.logit_scale)
        if not torch.isfinite(loss):
            raise SystemExit(f"toy_controls.py: the loss is {loss.item()} at step {step}; try a lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    # the export: a CLIP folder with the source's tokenizer files, as train.py's
    out = Path(args.out)
    save_clip(clip, out)
    for name in train.TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    record = {"settings": vars(args), "all_weights": all_weights, "hard_negatives": hard_negatives,
              "ranking": ({"images": len(ranking["captions"]), "timesteps": ranking["timesteps"],
                           "temperature": temperature, "weight": ranking_weight} if ranking else None),
              "trainable": n_trainable, "frozen": n_frozen, "losses": losses,
              "seconds": round(time.perf_counter() - start, 1)}
    (out / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if losses:
        print(f"done: {len(losses)} steps, loss {losses[0]:.4f} → {losses[-1]:.4f}; fine-tuned CLIP in {out}")
    return out


# ----------------------------------------------------------------------------- linear probes


def probe(embeds_train, labels_train, embeds_test, labels_test, l2: float = 1e-3, max_iter: int = 500) -> float:
    """A linear probe: multinomial logistic regression on standardised features, fitted by L-BFGS to
    convergence on (embeds_train (N, D), labels_train (N,)); returns the accuracy (%) on the test set.

        min_{W,b} 1/N Σ_n −log softmax(W x̂_n + b)_{y_n} + l2 ‖W‖²,   x̂ = (x − μ_train) / σ_train"""
    x, x_test = torch.as_tensor(embeds_train).double(), torch.as_tensor(embeds_test).double()
    y, y_test = torch.as_tensor(labels_train).long(), torch.as_tensor(labels_test).long()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x, x_test = (x - mean) / std, (x_test - mean) / std  # x̂, with the train split's statistics
    linear = nn.Linear(x.shape[1], int(max(y.max(), y_test.max())) + 1).double()
    nn.init.zeros_(linear.weight)  # a convex problem: start at the origin, the same answer every time
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return 100 * (linear(x_test).argmax(-1) == y_test).double().mean().item()


def first_colour(scene: dict) -> int:
    """The binding question: the colour of the first object, the left (axis h) or top (v) one."""
    return list(COLOURS).index(scene["first"][0])


def colour_pair(scene: dict) -> int:
    """The control question, no binding needed: which two colours the picture holds."""
    return COLOUR_PAIRS.index(frozenset({scene["first"][0], scene["second"][0]}))


QUESTIONS = {"first colour": first_colour, "colour pair": colour_pair}


def read_train(root: Path, count: int) -> tuple[torch.Tensor, list[list[str]], list[dict]]:
    """The first `count` images of the train split (by id): uint8 pixels (N, 3, H, W), captions, scenes."""
    data = json.loads((root / train.CAPTIONS_FILE).read_text())
    scenes = json.loads((root / "scenes.json").read_text())  # keyed by file name
    captions = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"])
    images = sorted(data["images"], key=lambda im: im["id"])[:count]
    pixels = as_pixels([Image.open(root / train.IMAGES_DIR / im["file_name"]) for im in images])
    return pixels, [captions[im["id"]] for im in images], [scenes[im["file_name"]] for im in images]


def read_examples(root: Path) -> tuple[list[Image.Image], list[list[str]], list[dict]]:
    """A Winoground-layout split's images (0, 1, 0, 1, …), each one's caption (a list of one) and scene."""
    examples, scenes, images = read_split(root)
    return (images, [[e[f"caption_{k}"]] for e in examples for k in range(2)],
            [scenes[e[f"image_{k}"]] for e in examples for k in range(2)])


@torch.no_grad()
def image_embeddings(clip, pixels: torch.Tensor) -> torch.Tensor:
    """f_φ(x) / ‖f_φ(x)‖ of uint8 pixels (N, 3, 32, 32): what CLIP's score compares."""
    return torch.cat([F.normalize(clip.encode_image(clip_pixels(p)), dim=-1) for p in pixels.split(512)])


@torch.no_grad()
def text_embeddings(clip, tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.cat([F.normalize(clip.encode_text(tokenizer(texts[i: i + 512])), dim=-1)
                      for i in range(0, len(texts), 512)])


def majority(labels: list) -> float:
    """The accuracy (%) of always guessing the most frequent label."""
    return 100 * Counter(labels).most_common(1)[0][1] / len(labels)


def binding_probe(clip_dir, paths: dict, split: str = "test", train_images: int = 2000) -> dict[str, float]:
    """Linear probes on the frozen embeddings of the CLIP in clip_dir, each question asked of the images
    and of the captions: trained on the first `train_images` train-split images (and all their captions),
    tested on the images and captions of `split` (a caption's label: the scene of its image). Accuracies
    (%), beside "chance" (always the most frequent test label) and, for the binding question, the best
    that the two colours alone allow (the most frequent first colour of each colour pair in the test set):
    an embedding that knows which colours but not where scores that, not more."""
    clip, tokenizer = load_clip(clip_dir).eval(), Tokenizer.from_pretrained(clip_dir)
    train_pixels, train_captions, train_scenes = read_train(Path(paths["train"]), train_images)
    test_images, test_captions, test_scenes = read_examples(Path(paths[split]))
    test_pixels = as_pixels(test_images)
    embeds = {"image": (image_embeddings(clip, train_pixels), image_embeddings(clip, test_pixels)),
              "text": (text_embeddings(clip, tokenizer, [c for cs in train_captions for c in cs]),
                       text_embeddings(clip, tokenizer, [c for cs in test_captions for c in cs]))}
    scenes = {"image": (train_scenes, test_scenes),  # one scene per caption: its image's
              "text": ([s for s, cs in zip(train_scenes, train_captions) for _ in cs],
                       [s for s, cs in zip(test_scenes, test_captions) for _ in cs])}
    results = {}
    for question, label in QUESTIONS.items():
        for tower in ("image", "text"):
            train_labels, test_labels = ([label(s) for s in part] for part in scenes[tower])
            results[f"{question}, {tower}"] = probe(embeds[tower][0], train_labels, embeds[tower][1], test_labels)
        results[f"{question}, chance"] = majority([label(s) for s in test_scenes])
    by_pair = defaultdict(list)
    for scene in test_scenes:
        by_pair[colour_pair(scene)].append(first_colour(scene))
    results["first colour, from the colours alone"] = 100 * sum(
        Counter(firsts).most_common(1)[0][1] for firsts in by_pair.values()) / len(test_scenes)
    print(f"probes on {len(train_scenes):,} train images and their {len(scenes['text'][0]):,} captions, "
          f"tested on {len(test_scenes)} {split} images and captions")
    return results


# ----------------------------------------------------------------------------- retention


def zero_shot(similarity: torch.Tensor, scenes: list[dict]) -> tuple[float, float]:
    """similarity (N, len(OBJECTS)) of each image with each object's prompt → (the share (%) of images whose
    two best prompts are exactly its two objects, the share whose best prompt is one of them)."""
    best = similarity.topk(2, dim=-1).indices.tolist()
    truth = [{tuple(s["first"]), tuple(s["second"])} for s in scenes]
    pair = [{OBJECTS[a], OBJECTS[b]} == objects for (a, b), objects in zip(best, truth)]
    top1 = [OBJECTS[a] in objects for (a, _), objects in zip(best, truth)]
    return 100 * float(np.mean(pair)), 100 * float(np.mean(top1))


@torch.no_grad()
def retention(clip_dir, paths: dict, split: str = "test") -> dict[str, float]:
    """The base skill of the CLIP in clip_dir on `split` (%): image→caption R@1 among the split's distinct
    captions (toyworld.caption_recall: the nearest caption describes the image's scene; or names its two
    objects, in any arrangement), and zero-shot object recognition with the prompts "a <colour> <shape>"
    of every object (OBJECTS): the top two prompts exactly the image's two objects, or the top one of them."""
    clip, tokenizer = load_clip(clip_dir).eval(), Tokenizer.from_pretrained(clip_dir)
    images, captions, scenes = read_examples(Path(paths[split]))
    prompts = text_embeddings(clip, tokenizer, [f"a {colour} {shape}" for colour, shape in OBJECTS])  # (objects, D)
    pair, top1 = zero_shot(image_embeddings(clip, as_pixels(images)) @ prompts.T, scenes)  # cos(f_φ(x), g_φ(prompt))
    scene_found, objects_found = caption_recall(clip, tokenizer, images, [c for [c] in captions], scenes)
    return {"image→caption R@1": scene_found, "image→caption R@1, the two objects": objects_found,
            "zero-shot objects, top 2 exact": pair, "zero-shot objects, top 1 present": top1}


# ----------------------------------------------------------------------------- what the UNet sees


def load_mapper(folder: Path, embed_dim: int) -> Mapper:
    """h_w from a train.py output folder's mapper.safetensors (its latent shape in the metadata)."""
    file = Path(folder) / "mapper.safetensors"
    if not file.is_file():
        raise SystemExit(f"toy_controls.py: {file} not found: the picture needs a train.py output folder "
                         f"(train.py writes h_w there)")
    with safe_open(file, "pt") as f:
        latent_shape = json.loads(f.metadata()["latent_shape"])
    mapper = Mapper(embed_dim, latent_shape)
    mapper.load_state_dict(load_file(file), strict=True)
    return mapper.eval()


@torch.no_grad()
def hw_picture(model_dirs: dict[str, Path], paths: dict, file, count: int = 6, split: str = "test") -> dict:
    """A PNG grid: image 0 of the first `count` examples of `split`, then per model (name → a train.py
    output folder) h_w(f_φ(x)) decoded by the toy VAE. h_w makes SD's z_0, the latent × scaling_factor,
    so the picture is D(h_w(f_φ(x)) / scaling_factor). Returns the decoded images, name → (count, 3, H, W)."""
    examples, _, images = read_split(Path(paths[split]))
    real = images[0::2][:count]
    pixels = as_pixels(real)
    vae = load_vae(Path(paths["sd"]) / "vae").eval()
    columns, decoded = [[(im, f"real: {e['caption_0']}") for im, e in zip(real, examples)]], {}
    for name, folder in model_dirs.items():
        clip = load_clip(folder).eval()
        mapper = load_mapper(folder, clip.config.projection_dim)
        if mapper.latent_shape[0] != vae.config.latent_channels:
            raise SystemExit(f"toy_controls.py: {folder}'s h_w makes latents {mapper.latent_shape}, the VAE in "
                             f"{paths['sd']} takes {vae.config.latent_channels} channels: another world's run?")
        z0 = mapper(clip.encode_image(clip_pixels(pixels)))  # z_0 = h_w(f_φ(x)), (count, 4, h, w)
        decoded[name] = vae.latents_to_images(z0)  # D(z_0 / scaling_factor), (count, 3, H, W)
        columns.append([(im, name) for im in to_pil(decoded[name])])
    sheet(columns, Path(file))
    return decoded


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> None:
    world = argparse.ArgumentParser(add_help=False)
    world.add_argument("--world", default=str(TOY_DIR), help="the toy world's data folder (drawn there if missing)")
    world.add_argument("--models", default=str(MODELS_DIR), help="the toy world's models (default: the shipped ones)")
    world.add_argument("--quick", action="store_true", help="a --quick world in --world (a check, not evidence)")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    f = commands.add_parser("finetune", parents=[world], help="the positive control (or --all_weights: the ceiling)")
    f.add_argument("--out", required=True, help="the fine-tuned CLIP's folder")
    f.add_argument("--seed", type=int, default=0, help="data order and captions (train.py's --seed)")
    f.add_argument("--all_weights", action="store_true", help="train every CLIP weight (the ceiling)")
    f.add_argument("--clip", help="the CLIP to fine-tune (default: the world's)")
    f.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    f.add_argument("--train_flags", default="", help="more train.py flags, e.g. '--epochs 5 --cosine'")
    f.add_argument("--ranking", action="store_true", help="no hard negatives: distil the teacher's ranking of "
                   "each caption and its swaps instead (computed once per world, then cached)")
    f.add_argument("--ranking_weight", type=float, default=1.0, help="β, the ranking loss's weight")
    f.add_argument("--ranking_images", type=int, default=RANKING_IMAGES, help="training images ranked")
    f.add_argument("--ranking_timesteps", type=int, default=RANKING_TIMESTEPS, help="diffusion timesteps per pair")
    for name, help_ in (("probe", "linear probes on the frozen embeddings"), ("retention", "the base skill")):
        c = commands.add_parser(name, parents=[world], help=help_)
        c.add_argument("--clip", help="a CLIP folder (default: the world's pre-trained CLIP)")
        c.add_argument("--split", choices=("val", "test", "new_objects"), default="test", help="the split to test on")
    c = commands.add_parser("picture", parents=[world], help="h_w(f_φ(x)) decoded by the VAE, per run")
    c.add_argument("--runs", nargs="+", required=True, help="train.py output folders (with mapper.safetensors)")
    c.add_argument("--names", nargs="+", help="a column title per run (default: the folder names)")
    c.add_argument("--out", required=True, help="the PNG to write")
    c.add_argument("--count", type=int, default=6, help="test images")
    args = p.parse_args(argv)
    if args.quick and Path(args.world) == TOY_DIR:
        p.error(f"--quick needs its own --world folder: {TOY_DIR} holds the full world")
    if args.command == "finetune" and not (math.isfinite(args.ranking_weight) and args.ranking_weight >= 0):
        p.error(f"--ranking_weight must be a finite number, 0 or more; got {args.ranking_weight}")
    if args.command == "finetune" and not (args.ranking_images >= 1 and 1 <= args.ranking_timesteps <= 1000):
        p.error(f"--ranking_images must be 1 or more and --ranking_timesteps between 1 and 1000; got "
                f"{args.ranking_images} and {args.ranking_timesteps}")
    paths = build(Path(args.world), quick=args.quick, models=Path(args.models))

    if args.command == "finetune":
        ranking = teacher_rankings(paths, args.ranking_images, args.ranking_timesteps) if args.ranking else None
        finetune_hard_negatives(args.clip or paths["clip"], paths["train"], args.out, args.seed, args.all_weights,
                                max_steps=args.max_steps, flags=args.train_flags.split(),
                                hard_negatives=not args.ranking, ranking=ranking, ranking_weight=args.ranking_weight)
        print(f"score it: python eval_winoground.py --clip {args.out} --data {paths['test']}")
    elif args.command == "probe":
        r = binding_probe(args.clip or paths["clip"], paths, args.split)
        print(f"probe ({args.split}): first colour: image {r['first colour, image']:.1f}, text "
              f"{r['first colour, text']:.1f} (chance {r['first colour, chance']:.1f}, from the colours alone "
              f"{r['first colour, from the colours alone']:.1f}); colour pair: image {r['colour pair, image']:.1f}, "
              f"text {r['colour pair, text']:.1f} (chance {r['colour pair, chance']:.1f})")
    elif args.command == "retention":
        r = retention(args.clip or paths["clip"], paths, args.split)
        print(f"retention ({args.split}): " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    else:
        names = args.names or [Path(run).name for run in args.runs]
        if len(names) != len(args.runs):
            p.error(f"--names gives {len(names)} titles for {len(args.runs)} --runs")
        hw_picture(dict(zip(names, map(Path, args.runs))), paths, args.out, args.count)
        print(f"wrote {args.out}: the real images, then h_w(f_φ(x)) decoded by the VAE for " + ", ".join(names))


if __name__ == "__main__":
    main()

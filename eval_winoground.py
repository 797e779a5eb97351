"""Winoground text, image and group scores for a CLIP checkpoint or for Stable Diffusion.

Winoground (Thrush et al. 2022, https://arxiv.org/abs/2204.03162) has 400 examples of two
images and two captions that use the same words in a different order ("a mug in some grass" /
"some grass in a mug"). A model gives a score s(c, i) to each caption–image pair; it gets
  text  credit when s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)  (the right caption per image),
  image credit when s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0)  (the right image per caption),
  group credit when both hold. Ties fail. Chance: 25, 25 and 16.67 %.

Two scorers:
  --clip PATH  s(c, i) = cosine similarity of CLIP's caption and image embeddings.
  --sd PATH    the diffusion score of Diffusion Classifier (Li et al. 2023,
               https://arxiv.org/abs/2303.16203): s(c, i) = −E_t ‖ε_θ(z_t, t, c) − ε‖² over a
               fixed grid of timesteps, with one noise ε per timestep shared by the four pairs of
               an example. --normalize_image_score subtracts the empty-prompt error first, as
               DiffusionITM (Krojer et al. 2023, https://arxiv.org/abs/2305.13812) does for image
               retrieval (some images are easier to denoise whatever the caption).

Data: a local copy of the gated facebook/winoground dataset (examples.jsonl + images/ or
images.zip, or its parquet files when pyarrow is installed); weights: a CLIP checkpoint folder
(load_clip) or a Stable Diffusion 1.x or 2.x-base diffusers folder; or the hub id of either, when it is in
the local Hugging Face cache.

    python eval_winoground.py --clip weights/clip-vit-base-patch32 --out out/clip.json
    python eval_winoground.py --sd weights/stable-diffusion-v1-4 --timesteps 20 --out out/sd.json
    python eval_winoground.py --toy --sd          # the toy world's SD on its test split (weights/toyworld/)

Every score comes with its 95 % bootstrap interval over examples (Winoground's 400 examples leave a
group score of 8 uncertain by about ±2.6 points). Two runs on the same examples are compared per
example: the difference with a paired bootstrap interval, and McNemar's exact test on the examples
that only one of them gets right:

    python eval_winoground.py --compare out/clip.json out/sds-clip.json

The diffusion score costs 2 × 2 × timesteps UNet calls per example (×1.5 with the empty prompt):
32,000 for Winoground at 20 timesteps: at ≈4 s per UNet call on a 2-core CPU, some 35 hours; use a GPU.
"""

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip import Tokenizer, image_transform
from sds import NUM_TRAIN_TIMESTEPS, NoiseSchedule, StableDiffusion, denoising_error, encode_prompt
from sds import sd_image_transform
from weights.networks import DOWNLOAD_HINT, hub_path, load_clip, load_stable_diffusion, load_tokenizer
from weights.runs import can_write, write_results
from weights.winoground import METRICS, Example, ImagePairs, Winoground, read_pair

DEFAULT_DATA = "weights/winoground"
DEFAULT_CLIP = "weights/clip-vit-base-patch32"
DEFAULT_SD = "weights/stable-diffusion-v1-4"
# --toy: the small world of weights/toyworld/ (its models ship in weights/toy-models, its data is
# drawn on first use).
TOY_DATA, TOY_CLIP, TOY_SD = ("weights/toy/data/test", "weights/toy-models/clip",
                              "weights/toy-models/sd")
MAX_RESOLUTION = 2048  # --resolution: 4 × SD 1.x's 512; far larger only runs out of memory
# --resolution: at most this many times the model's own side (SD 1.x: 512 → MAX_RESOLUTION); 16 ×
# the pixels of every UNet call already, at a scale the UNet never saw in training
MODEL_RESOLUTION_FACTOR = 4
PRECISIONS = ("bf16", "fp32")  # --precision
# --bootstrap; on 400 examples an interval's ends vary by ≈ 0.15 points (sd) across seeds
BOOTSTRAP_RESAMPLES = 2000
# the same resamples on every run: an interval is a function of the per-example credits alone
BOOTSTRAP_SEED = 0
# --bootstrap draws all resamples at once: (R, N) indices and the (R, N, 3) credits they pick, 8
# bytes each (R = 2000, N = 400: 26 MB); far more only risks running out of memory after the scoring
MAX_BOOTSTRAP_BYTES = 2 << 30


# ----------------------------------------------------------------------------- metrics


def text_correct(s) -> bool:
    """s[c][i], a 2×2 score matrix: each image prefers its own caption."""
    return s[0][0] > s[1][0] and s[1][1] > s[0][1]


def image_correct(s) -> bool:
    """Each caption prefers its own image."""
    return s[0][0] > s[0][1] and s[1][1] > s[1][0]


def group_correct(s) -> bool:
    return text_correct(s) and image_correct(s)


def bootstrap_interval(values, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                       seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(2, K): the percentile bootstrap interval of the column means of `values` (N, K), one row per
    example: the central `level` of the means of `resamples` resamples of the N rows, drawn with
    replacement. Two runs' credits side by side (or their difference) are resampled by example,
    together: the paired bootstrap."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)  # (N, K)
    rows = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))  # (R, N)
    means = values[rows].mean(axis=1)  # (R, K)
    return np.percentile(means, [50 * (1 - level), 50 * (1 + level)], axis=0)


def check_resamples(resamples: int, n: int) -> None:
    """A ValueError, before any work, for a bootstrap of n examples that would not fit the bound."""
    if resamples * n * 4 * 8 > MAX_BOOTSTRAP_BYTES:
        raise ValueError(f"--bootstrap {resamples} needs {resamples * n * 32 / 2**30:.1f} GiB on "
                         f"{n} example(s) (resamples × examples × 4 × 8 bytes), more than "
                         f"{MAX_BOOTSTRAP_BYTES >> 30} GiB; pass --bootstrap "
                         f"{MAX_BOOTSTRAP_BYTES // (32 * n)} or fewer")


def mcnemar_p(b: int, c: int) -> float:
    """Exact McNemar test of two models on the same examples, from the discordant pairs: b right
    only for the first, c right only for the second. Under "equally good", X ~ Binomial(b + c, ½)
    and p = min(1, 2·P(X ≤ min(b, c))) (two-sided); p = 1 when no example tells them apart."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


# ----------------------------------------------------------------------------- CLIP score


@torch.no_grad()
def clip_scores(model, tokenizer: Tokenizer, data: Winoground, examples: list[Example],
                batch_size: int = 32, device: str | torch.device = "cpu", workers: int = 0,
                precision: str = "fp32") -> torch.Tensor:
    """(N, 2, 2) cosine similarities s[n, c, i] of caption c and image i, batch_size examples at a
    time; precision "bf16" runs the towers under bfloat16 autocast (the cosines are taken in
    float32)."""
    size = model.config.vision.image_size
    pairs = ImagePairs(data, examples, image_transform(size), size)
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, num_workers=workers)
    dtype = next(model.parameters()).dtype
    scores = []
    with tqdm(total=len(examples), desc="CLIP", unit="example") as progress:
        # pixels: (B, 2, 3, S, S)
        for start, pixels in zip(range(0, len(examples), batch_size), loader):
            batch = examples[start : start + batch_size]
            # (2B, 77)
            ids = tokenizer([caption for e in batch for caption in (e.caption_0, e.caption_1)])
            with autocast(device, precision):
                images = model.encode_image(pixels.flatten(0, 1).to(device, dtype))  # (2B, D)
                texts = model.encode_text(ids.to(device))  # (2B, D)
            # float32: a bfloat16 cosine keeps 8 bits (steps of 2^-9 near 0.3), and Winoground
            # counts a tie as a failure
            images, texts = F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1)
            # (B, caption, image): each example's captions against its own two images only.
            # (B, 2, D)
            texts, images = texts.view(len(batch), 2, -1), images.view(len(batch), 2, -1)
            scores.append(torch.einsum("bcd,bid->bci", texts, images))
            progress.update(len(batch))
    return torch.cat(scores).float().cpu()


def autocast(device: str | torch.device, precision: str) -> torch.autocast:
    """precision "bf16": matmuls and convolutions in bfloat16 under autocast; "fp32": autocast
    off."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


# ----------------------------------------------------------------------------- diffusion score


def timestep_grid(n: int) -> torch.Tensor:
    """The centres of n equal bins of the timesteps 0 … 999, rounded down:
    t_k = ⌊(k + ½) · 1000 / n⌋. n = 20 gives 25, 75, …, 975 (the grid of Diffusion Classifier);
    n = 1000 gives every timestep."""
    if not 1 <= n <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"--timesteps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {n}")
    return ((torch.arange(n) + 0.5) * NUM_TRAIN_TIMESTEPS / n).long()


@torch.no_grad()
def diffusion_errors(sd: StableDiffusion, data: Winoground, examples: list[Example],
                     timesteps: torch.Tensor, seed: int = 0, batch_size: int = 8,
                     resolution: int | None = None, unconditional: bool = False,
                     device: str | torch.device = "cpu", workers: int = 0,
                     precision: str = "fp32") -> torch.Tensor:
    """(N, C, 2, T) denoising errors ‖ε_θ(z_t, t, c) − ε‖² of caption c (C = 2, or 3 with the empty
    prompt last when `unconditional`) on image i at timestep timesteps[k]; images at `resolution`
    pixels a side (default: the model's own, sd.resolution).

    Noise: a CPU generator seeded with `seed` draws, example after example in order, one
    (T, 4, h, w) tensor; ε for timestep k is its k-th slice, shared by the pairs of the example,
    so that the pairs differ only in caption and image (a paired comparison, much less noisy).
    The C × 2 × T UNet calls of an example run batch_size at a time, under bfloat16 autocast with
    precision "bf16" (load `sd` in bfloat16 too:
    load_stable_diffusion(..., dtype=torch.bfloat16))."""
    device = torch.device(device)
    schedule = NoiseSchedule()  # SD 1.x's training schedule
    resolution = resolution or sd.resolution
    pairs = ImagePairs(data, examples, sd_image_transform(resolution), resolution)
    # one example at a time
    loader = torch.utils.data.DataLoader(pairs, batch_size=None, num_workers=workers)
    generator = torch.Generator().manual_seed(seed)
    timesteps = timesteps.to(device)
    errors = []
    with autocast(device, precision):
        # (1, 77, 768)
        empty = encode_prompt(sd.text_encoder, sd.tokenizer, [""]) if unconditional else None
        for example, pixels in tqdm(zip(examples, loader), total=len(examples),
                                    desc="diffusion score", unit="example"):
            # (2, 4, R/8, R/8): posterior mean × scaling factor
            latents = sd.vae.images_to_latents(pixels.to(device))
            captions = [example.caption_0, example.caption_1]
            context = encode_prompt(sd.text_encoder, sd.tokenizer, captions)  # (2, 77, 768)
            if empty is not None:
                context = torch.cat([context, empty])  # (3, 77, 768)
            noise = torch.randn((len(timesteps), *latents.shape[1:]),
                                generator=generator).to(device)  # (T, 4, h, w)
            # Every (caption, image, timestep) triple, flattened in that order.
            c, i, k = (index.flatten() for index in torch.meshgrid(
                torch.arange(len(context)), torch.arange(2), torch.arange(len(timesteps)),
                indexing="ij"))
            error = torch.cat([
                denoising_error(sd.unet, latents[i[s]], timesteps[k[s]], noise[k[s]],
                                context[c[s]], schedule).float()
                for s in torch.arange(len(c)).split(batch_size)
            ])
            errors.append(error.view(len(context), 2, len(timesteps)).cpu())
    return torch.stack(errors)


# ----------------------------------------------------------------------------- results


def score_examples(examples: list[Example], scores: torch.Tensor,
                   image_scores: torch.Tensor | None = None) -> list[dict]:
    """One record per example: its tags, the 2×2 matrix s[c][i] and the three credits. With
    `image_scores` (the normalised diffusion score) the image credit is judged on those instead."""
    records = []
    judged_on = image_scores if image_scores is not None else scores
    for example, s, s_image in zip(examples, scores.tolist(), judged_on.tolist()):
        text, image = text_correct(s), image_correct(s_image)
        record = {"id": example.id, "tag": example.tag, "secondary_tag": example.secondary_tag,
                  "num_main_preds": example.num_main_preds, "collapsed_tag": example.collapsed_tag,
                  "scores": s}
        if image_scores is not None:
            record["image_scores"] = s_image
        records.append(record | {"text": text, "image": image, "group": text and image})
    return records


def percentages(records: list[dict], resamples: int = 0) -> dict:
    """n and the three scores in %; with `resamples`, "ci95": each score's 95 % bootstrap interval
    over examples."""
    n = len(records)
    row = {"n": n} | {key: 100 * sum(r[key] for r in records) / n for key in METRICS}
    if resamples:
        low, high = 100 * bootstrap_interval([[r[key] for key in METRICS] for r in records],
                                             resamples)
        row["ci95"] = {key: [lo, hi] for key, lo, hi in zip(METRICS, low.tolist(), high.tolist())}
    return row


def summarize(records: list[dict], resamples: int = 0) -> dict:
    """Overall and per-subset percentages: by collapsed_tag and by num_main_preds, as in the
    paper."""
    summary = {"all": percentages(records, resamples)}
    for key in ("collapsed_tag", "num_main_preds"):
        groups = defaultdict(list)
        for record in records:
            groups[record[key]].append(record)
        for value in sorted(groups):
            summary[f"{key}={value}"] = percentages(groups[value], resamples)
    return summary


def format_table(summary: dict, title: str) -> str:
    """One row per subset: n and each score, followed by its 95 % interval where the row has one."""
    # room for " [ 26.3,  35.3]"
    pad = " " * 15 if any("ci95" in row for row in summary.values()) else ""
    lines = [title,
             (f"{'subset':<26}{'n':>5}" + "".join(f"{key:>8}{pad}" for key in METRICS)).rstrip()]
    for name, row in summary.items():
        ci = row.get("ci95")
        cells = [f"{row[key]:>8.2f}" + (" [{:5.1f}, {:5.1f}]".format(*ci[key]) if ci else pad)
                 for key in METRICS]
        lines.append(f"{name:<26}{row['n']:>5}" + "".join(cells))
    return "\n".join(lines)


def compare_runs(path_a: str | Path, path_b: str | Path,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Run B against run A on the same examples (matched by id): per score, both percentages, the
    difference B − A in points with its paired bootstrap 95 % interval, the discordant examples
    (right only in A, right only in B) and McNemar's exact p-value on them."""
    a, b = read_pair(path_a, path_b)  # the same examples of the same data, or a ValueError
    ids = sorted(a.credits)
    check_resamples(resamples, len(ids))
    # (N, 3) each
    credit_a, credit_b = (np.array([run.credits[i] for i in ids], dtype=np.float64)
                          for run in (a, b))
    low, high = 100 * bootstrap_interval(credit_b - credit_a, resamples)
    n, metrics = len(ids), {}
    for k, key in enumerate(METRICS):
        right_a, right_b = int(credit_a[:, k].sum()), int(credit_b[:, k].sum())
        only_a = int((credit_a[:, k] > credit_b[:, k]).sum())
        only_b = int((credit_b[:, k] > credit_a[:, k]).sum())
        metrics[key] = {"a": 100 * right_a / n, "b": 100 * right_b / n,
                        "difference": 100 * (right_b - right_a) / n,
                        "ci95": [float(low[k]), float(high[k])],
                        "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_p(only_a, only_b)}
    return {"a": str(path_a), "b": str(path_b), "n": n, "bootstrap_resamples": resamples,
            "metrics": metrics}


def format_comparison(comparison: dict) -> str:
    lines = [f"Winoground, B − A on {comparison['n']} examples scored by both: "
             f"A = {comparison['a']}, B = {comparison['b']}",
             f"{'':<8}{'A':>8}{'B':>8}{'B − A':>8}{'95 % interval':>18}{'only A':>8}{'only B':>8}"
             f"{'McNemar p':>11}"]
    for key, row in comparison["metrics"].items():
        interval = "[{:+.1f}, {:+.1f}]".format(*row["ci95"])
        lines.append(f"{key:<8}{row['a']:>8.2f}{row['b']:>8.2f}{row['difference']:>+8.2f}"
                     f"{interval:>18}{row['only_a']:>8}{row['only_b']:>8}{row['mcnemar_p']:>11.3g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    # const="": given alone, the flag means the default model (the toy world's with --toy).
    model.add_argument("--clip", nargs="?", const="",
                       help=f"CLIP checkpoint folder or .safetensors (alone: {DEFAULT_CLIP}; the "
                            f"default when neither is given)")
    model.add_argument("--sd", nargs="?", const="",
                       help=f"Stable Diffusion 1.x or 2.x-base diffusers folder or hub id (alone: "
                            f"{DEFAULT_SD})")
    parser.add_argument("--toy", action="store_true",
                        help=f"the toy world of weights/toyworld/: --data defaults to "
                             f"{TOY_DATA}, a bare --clip means {TOY_CLIP} (also the default "
                             f"model), a bare --sd {TOY_SD}")
    parser.add_argument("--data", help=f"facebook/winoground copy: folder (or its data/) with "
                                       f"examples.jsonl + images/ or images.zip, or parquet "
                                       f"(default: {DEFAULT_DATA})")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder (vocab.json + merges.txt); "
                                            "default: the checkpoint's folder")
    parser.add_argument("--out", help="write settings, totals and per-example scores (with "
                                      "--compare: the comparison) to this JSON file")
    parser.add_argument("--limit", type=int, help="score only the first N examples (quick runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--batch_size", type=int, help="CLIP: examples per batch (default 32); "
                                                       "SD: UNet inputs per batch (default 8; more "
                                                       "on a GPU)")
    parser.add_argument("--workers", type=int, help="processes that decode and resize images "
                                                    "(default: 4 with CUDA, 0 on a CPU, whose "
                                                    "cores the model already uses)")
    add_score_options(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def add_score_options(parser: argparse.ArgumentParser) -> None:
    """The diffusion score's settings, the precision, the intervals and --compare."""
    parser.add_argument("--timesteps", type=int, default=20,
                        help="SD: number of timesteps t_k = ⌊(k+½)·1000/N⌋ (20 → 25, 75, …, 975)")
    parser.add_argument("--seed", type=int, default=0, help="SD: seed of the noise")
    parser.add_argument("--resolution", type=int, help="SD: image side in pixels before the VAE "
                                                       "(default: the model's own, UNet "
                                                       "sample_size × VAE factor: 512 for SD 1.x)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="bf16: bfloat16 autocast (SD held in bfloat16); fp32: float32 "
                             "throughout (default: bf16 for --sd on CUDA, else fp32: CLIP's 800 "
                             "images take seconds in float32)")
    parser.add_argument("--normalize_image_score", action="store_true",
                        help="SD: judge images on the error minus the empty-prompt error "
                             "(DiffusionITM)")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES,
                        help="resamples of the examples for the 95 %% intervals of every score "
                             "(seeded)")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="instead of scoring: B − A of two runs saved with --out, on the same "
                             "examples, with a paired bootstrap 95 %% interval and McNemar's exact "
                             "p-value")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse's one-line error for a value no run can use; the paths the user did not spell out:
    the toy world's with --toy, else the real models and data."""
    if args.compare and (args.clip is not None or args.sd is not None or args.toy):
        parser.error("--compare reads two saved runs; it takes no --clip, --sd or --toy")
    if args.bootstrap < 1:
        parser.error("--bootstrap must be a positive number of resamples")
    try:  # on one example; on all of them once the data is read
        check_resamples(args.bootstrap, 1)
    except ValueError as err:
        parser.error(str(err))
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be a positive number of examples")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be positive")
    if args.resolution is not None and not 1 <= args.resolution <= MAX_RESOLUTION:
        parser.error(f"--resolution must be between 1 and {MAX_RESOLUTION} pixels, got "
                     f"{args.resolution}")
    # before hours of scoring
    if args.out and (Path(args.out).is_dir() or not can_write(Path(args.out).parent)):
        parser.error(f"--out {args.out} cannot be written (a folder, or a file or a read-only "
                     f"folder is in its way); pass another --out")
    if args.workers is None:
        args.workers = 4 if torch.device(args.device).type == "cuda" else 0
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    if args.toy:
        # draws the toy data on first use; paths from wherever this runs
        from weights.toyworld import build
        toy = build()
        args.data = args.data or str(toy["test"])
        args.clip = (str(toy["clip"]) if args.clip == "" or (args.clip is None and args.sd is None)
                     else args.clip)
        args.sd = str(toy["sd"]) if args.sd == "" else args.sd
    if args.data is None:
        args.data = DEFAULT_DATA
    if args.clip == "":
        args.clip = DEFAULT_CLIP
    if args.sd == "":
        args.sd = DEFAULT_SD
    if args.precision is None:  # as before --precision existed: the diffusion score in bf16 on CUDA
        args.precision = ("bf16" if args.sd is not None and torch.device(args.device).type == "cuda"
                          else "fp32")
    # the results file must never replace a file the run reads
    inputs = args.compare or [args.data, Path(args.data) / "examples.jsonl", args.clip, args.sd,
                              Path(args.data) / "data" / "examples.jsonl", args.tokenizer]
    if args.out and Path(args.out).resolve() in {Path(p).resolve() for p in inputs if p}:
        parser.error(f"--out {args.out} is a file this run reads; pass another --out")


def check_finite(values: torch.Tensor, examples: list[Example], model: str) -> None:
    """Scores are compared with >, and every comparison with a NaN is false: NaN scores would read
    as 0 % everywhere rather than as the broken model they come from."""
    bad = [e.id for e, v in zip(examples, values) if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{model} gives NaN or infinite scores for {len(bad)} of {len(examples)} "
                         f"examples (ids {', '.join(map(str, bad[:10]))}); its weights are "
                         f"damaged, or overflow in this precision — check the checkpoint, or pass "
                         f"--precision fp32")


def score_clip(args: argparse.Namespace, data: Winoground, examples: list[Example],
               settings: dict) -> tuple:
    """--clip: the records of the cosine score, and the table's title; `settings` gains the
    run's."""
    clip_path = hub_path(args.clip)  # a hub id: its snapshot in the local Hugging Face cache
    model = load_clip(clip_path, args.device)
    if model.vision_model is None:
        raise ValueError(f"{clip_path} holds a text tower only (Stable Diffusion's text_encoder?); "
                         f"scoring images needs a full CLIP checkpoint")
    beside = clip_path if clip_path.is_dir() else clip_path.parent
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else beside
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; or pass --tokenizer with the folder of the CLIP it was "
                                f"fine-tuned from") from None
    rows = model.text_model.embeddings.token_embedding.num_embeddings
    top = max(tokenizer.encoder.values())
    if top >= rows:  # else an IndexError from the embedding, batches into the run
        raise ValueError(f"the tokenizer of {tokenizer_path} gives ids up to {top}, but "
                         f"{clip_path} embeds {rows} tokens; pass --tokenizer with the folder of "
                         f"the CLIP it was trained or fine-tuned from")
    batch_size = args.batch_size or 32
    settings |= {"scorer": "clip", "model": str(clip_path), "tokenizer": str(tokenizer_path),
                 "batch_size": batch_size,
                 "score": "cosine similarity of the caption and image embeddings"}
    scores = clip_scores(model, tokenizer, data, examples, batch_size, args.device, args.workers,
                         args.precision)
    check_finite(scores, examples, f"CLIP {clip_path}")
    records = score_examples(examples, scores)
    title = f"Winoground, CLIP {clip_path}"
    return records, title


def score_sd(args: argparse.Namespace, data: Winoground, examples: list[Example],
             settings: dict) -> tuple:
    """--sd: the diffusion score's records and the table's title; `settings` gains the run's."""
    timesteps = timestep_grid(args.timesteps)
    sd = load_stable_diffusion(
        args.sd, args.device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    batch_size, resolution = args.batch_size or 8, args.resolution or sd.resolution
    if resolution > MODEL_RESOLUTION_FACTOR * sd.resolution:
        raise ValueError(f"--resolution {resolution} is more than {MODEL_RESOLUTION_FACTOR} × "
                         f"the {sd.resolution} pixels of {args.sd}; pass --resolution "
                         f"{MODEL_RESOLUTION_FACTOR * sd.resolution} or less, or leave it out")
    settings |= {"scorer": "diffusion", "model": str(args.sd), "timesteps": timesteps.tolist(),
                 "seed": args.seed, "resolution": resolution, "batch_size": batch_size,
                 "normalize_image_score": args.normalize_image_score,
                 "score": "minus the mean over timesteps of the denoising error "
                          "‖ε_θ(z_t, t, c) − ε‖²"}
    errors = diffusion_errors(sd, data, examples, timesteps, args.seed, batch_size, resolution,
                              args.normalize_image_score, args.device, args.workers,
                              args.precision)  # (N, C, 2, T)
    check_finite(errors, examples, f"Stable Diffusion {args.sd}")
    scores = -errors[:, :2].mean(dim=-1)  # (N, 2, 2): s[c][i] = −E_t error
    image_scores = (-(errors[:, :2] - errors[:, 2:]).mean(dim=-1)
                    if args.normalize_image_score else None)
    records = score_examples(examples, scores, image_scores)
    title = (f"Winoground, Stable Diffusion {args.sd}, {len(timesteps)} timesteps, "
             f"seed {args.seed}") + (
        ", image score normalised" if args.normalize_image_score else "")
    return records, title


def evaluate(args: argparse.Namespace) -> dict:
    """Score Winoground as the command line asks; returns the results.json content."""
    if args.clip is None and args.sd is None:
        if not Path(DEFAULT_CLIP).exists():
            raise FileNotFoundError(f"no model given and {DEFAULT_CLIP} not found — "
                                    f"{DOWNLOAD_HINT}, or pass --clip PATH or --sd PATH")
        args.clip = DEFAULT_CLIP
    elif args.clip == DEFAULT_CLIP and not Path(DEFAULT_CLIP).exists():  # a bare --clip
        raise FileNotFoundError(f"--clip takes a CLIP checkpoint folder or .safetensors file; "
                                f"without a path it means {DEFAULT_CLIP}, which is not there — "
                                f"{DOWNLOAD_HINT} or pass --clip PATH")
    data = Winoground(args.data)
    examples = data.examples[: args.limit]
    check_resamples(args.bootstrap, len(examples))
    settings = {"data": str(args.data), "examples": len(examples), "device": args.device,
                "precision": args.precision, "bootstrap_resamples": args.bootstrap,
                "torch": torch.__version__}
    if args.clip is not None:
        records, title = score_clip(args, data, examples, settings)
    else:
        records, title = score_sd(args, data, examples, settings)
    try:
        summary = summarize(records, args.bootstrap)
    except BaseException:  # MemoryError, Ctrl-C: the scores took hours, the intervals take seconds
        if args.out:
            write_results({"settings": settings, "examples": records}, args.out)
        raise
    print(format_table(summary, f"{title} ({len(records)} examples; chance 25 / 25 / 16.67)"))
    return {"settings": settings, "totals": summary["all"], "subsets": summary, "examples": records}


if __name__ == "__main__":
    arguments = parse_args()
    try:
        if arguments.compare:
            results = compare_runs(*arguments.compare, arguments.bootstrap)
            print(format_comparison(results))
        else:
            results = evaluate(arguments)
    except (FileNotFoundError, ValueError, ImportError) as err:
        # One line: a DataLoader worker's error arrives as "Caught … Original Traceback …
        # Type: message".
        sys.exit(f"error: "
                 f"{str(err).strip().splitlines()[-1].removeprefix(type(err).__name__ + ': ')}")
    if arguments.out:
        write_results(results, arguments.out)

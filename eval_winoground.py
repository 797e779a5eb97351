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

The same scorers on two-caption benchmarks, where an item is right when its image scores the true
caption above the false one (ties fail; the diffusion score shares one noise per timestep between the
two captions): SugarCrepe (Hsieh et al. 2023, https://arxiv.org/abs/2306.14610; accuracy per file and
per category, the mean of its files) and ARO's VG-Relation and VG-Attribution (Yuksekgonul et al. 2023,
https://arxiv.org/abs/2210.01936; accuracy per relation or attribute pair, and their mean):

    python eval_winoground.py --sugarcrepe weights/sugarcrepe --images weights/coco/val2017 --clip
    python eval_winoground.py --aro weights/aro --sd weights/stable-diffusion-v1-4

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
from weights.aro import ARO, MIN_GROUP_ITEMS
from weights.aro import FILES as ARO_FILES
from weights.sugarcrepe import FILES as SUGARCREPE_FILES
from weights.sugarcrepe import Item, ItemImages, SugarCrepe
from weights.winoground import CHOICE, METRICS, Example, ImagePairs, Winoground, read_pair

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
# settings.benchmark of a results file → its name in the tables
BENCHMARKS = {"winoground": "Winoground", "sugarcrepe": "SugarCrepe", "aro": "ARO"}


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
    means = resampled_means(values, resamples, seed)  # (R, K)
    return np.percentile(means, [50 * (1 - level), 50 * (1 + level)], axis=0)


def resampled_means(values, resamples: int, seed: int) -> np.ndarray:
    """(R, K): the column means of R resamples (with replacement) of the N rows of `values`
    (N, K)."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)  # (N, K)
    rows = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))  # (R, N)
    return values[rows].mean(axis=1)


def mean_of_groups_interval(groups: list, resamples: int = BOOTSTRAP_RESAMPLES,
                            level: float = 0.95, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(2,): the bootstrap interval of the mean of the groups' accuracies (SugarCrepe's category,
    ARO's mean over relations): each group is resampled within itself (seed + its index), as the
    benchmark fixes the groups and their sizes, and the R means of the group means are ranked."""
    means = np.mean([resampled_means(g, resamples, seed + k)[:, 0] for k, g in enumerate(groups)],
                    axis=0)  # (R,)
    return np.percentile(means, [50 * (1 - level), 50 * (1 + level)])


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


def clip_scores(model, tokenizer: Tokenizer, data: Winoground, examples: list[Example],
                batch_size: int = 32, device: str | torch.device = "cpu", workers: int = 0,
                precision: str = "fp32") -> torch.Tensor:
    """(N, 2, 2) cosine similarities s[n, c, i] of caption c and image i, batch_size examples at a
    time; precision "bf16" runs the towers under bfloat16 autocast (the cosines are taken in
    float32)."""
    size = model.config.vision.image_size
    pairs = ImagePairs(data, examples, image_transform(size), size)
    captions = [[e.caption_0, e.caption_1] for e in examples]
    return cosine_scores(model, tokenizer, pairs, captions, batch_size, device, workers, precision)


def choice_clip_scores(model, tokenizer: Tokenizer, data, items: list[Item],
                       batch_size: int = 32, device: str | torch.device = "cpu", workers: int = 0,
                       precision: str = "fp32") -> torch.Tensor:
    """(N, 2): the cosine of each item's image with its caption, then with its negative."""
    size = model.config.vision.image_size
    images = ItemImages(data, items, image_transform(size), size)
    captions = [[item.caption, item.negative] for item in items]
    return cosine_scores(model, tokenizer, images, captions, batch_size, device, workers,
                         precision)[:, :, 0]


@torch.no_grad()
def cosine_scores(model, tokenizer: Tokenizer, images: torch.utils.data.Dataset,
                  captions: list[list[str]], batch_size: int, device: str | torch.device,
                  workers: int, precision: str) -> torch.Tensor:
    """(N, C, I) cosine similarities of item n's C captions with its I images (`images`[n]:
    (I, 3, S, S)), batch_size items at a time."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers)
    dtype = next(model.parameters()).dtype
    scores = []
    with tqdm(total=len(captions), desc="CLIP", unit="example") as progress:
        # pixels: (B, I, 3, S, S)
        for start, pixels in zip(range(0, len(captions), batch_size), loader):
            batch = captions[start : start + batch_size]
            ids = tokenizer([caption for texts in batch for caption in texts])  # (BC, 77)
            with autocast(device, precision):
                image = model.encode_image(pixels.flatten(0, 1).to(device, dtype))  # (BI, D)
                text = model.encode_text(ids.to(device))  # (BC, D)
            # float32: a bfloat16 cosine keeps 8 bits (steps of 2^-9 near 0.3), and every
            # benchmark here counts a tie as a failure
            image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
            # (B, caption, image): each item's captions against its own images only.
            # (B, C, D), (B, I, D)
            text = text.view(len(batch), -1, text.shape[-1])
            image = image.view(*pixels.shape[:2], -1)
            scores.append(torch.einsum("bcd,bid->bci", text, image))
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
    resolution = resolution or sd.resolution
    pairs = ImagePairs(data, examples, sd_image_transform(resolution), resolution)
    captions = [[e.caption_0, e.caption_1] for e in examples]
    return item_errors(sd, pairs, captions, timesteps, seed, batch_size, unconditional, device,
                       workers, precision)


def choice_diffusion_errors(sd: StableDiffusion, data, items: list[Item], timesteps: torch.Tensor,
                            seed: int = 0, batch_size: int = 8, resolution: int | None = None,
                            device: str | torch.device = "cpu", workers: int = 0,
                            precision: str = "fp32") -> torch.Tensor:
    """(N, 2, T) denoising errors of each item's image under its caption, then its negative, with
    one noise per timestep shared by the two (drawn as diffusion_errors draws it)."""
    resolution = resolution or sd.resolution
    images = ItemImages(data, items, sd_image_transform(resolution), resolution)
    captions = [[item.caption, item.negative] for item in items]
    return item_errors(sd, images, captions, timesteps, seed, batch_size, False, device, workers,
                       precision)[:, :, 0]


@torch.no_grad()
def item_errors(sd: StableDiffusion, images: torch.utils.data.Dataset, captions: list[list[str]],
                timesteps: torch.Tensor, seed: int, batch_size: int, unconditional: bool,
                device: str | torch.device, workers: int, precision: str) -> torch.Tensor:
    """(N, C, I, T) errors of item n's C captions (and "" last when `unconditional`) on its I
    images (`images`[n]: (I, 3, R, R)), with the noise of diffusion_errors."""
    device = torch.device(device)
    schedule = NoiseSchedule()  # SD 1.x's training schedule
    # one item at a time
    loader = torch.utils.data.DataLoader(images, batch_size=None, num_workers=workers)
    generator = torch.Generator().manual_seed(seed)
    timesteps = timesteps.to(device)
    errors = []
    with autocast(device, precision):
        # (1, 77, 768)
        empty = encode_prompt(sd.text_encoder, sd.tokenizer, [""]) if unconditional else None
        for texts, pixels in tqdm(zip(captions, loader), total=len(captions),
                                  desc="diffusion score", unit="example"):
            # (I, 4, R/8, R/8): posterior mean × scaling factor
            latents = sd.vae.images_to_latents(pixels.to(device))
            context = encode_prompt(sd.text_encoder, sd.tokenizer, texts)  # (C, 77, 768)
            if empty is not None:
                context = torch.cat([context, empty])  # (C + 1, 77, 768)
            noise = torch.randn((len(timesteps), *latents.shape[1:]),
                                generator=generator).to(device)  # (T, 4, h, w)
            # Every (caption, image, timestep) triple, flattened in that order.
            c, i, k = (index.flatten() for index in torch.meshgrid(
                torch.arange(len(context)), torch.arange(len(latents)),
                torch.arange(len(timesteps)), indexing="ij"))
            error = torch.cat([
                denoising_error(sd.unet, latents[i[s]], timesteps[k[s]], noise[k[s]],
                                context[c[s]], schedule).float()
                for s in torch.arange(len(c)).split(batch_size)
            ])
            errors.append(error.view(len(context), len(latents), len(timesteps)).cpu())
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


def score_items(items: list[Item], scores: torch.Tensor) -> list[dict]:
    """One record per two-caption item (SugarCrepe, ARO): where it comes from, its scores
    [s(caption), s(negative)] and its one credit, "correct": the caption scores higher (ties
    fail)."""
    return [{"id": item.id, "file": item.file, "key": item.key, "subset": item.subset,
             "scores": s, "correct": s[0] > s[1]} for item, s in zip(items, scores.tolist())]


def percentages(records: list[dict], resamples: int = 0, metrics: tuple = METRICS) -> dict:
    """n and each credit in %; with `resamples`, "ci95": each one's 95 % bootstrap interval over
    examples."""
    n = len(records)
    row = {"n": n} | {key: 100 * sum(r[key] for r in records) / n for key in metrics}
    if resamples:
        low, high = 100 * bootstrap_interval([[r[key] for key in metrics] for r in records],
                                             resamples)
        row["ci95"] = {key: [lo, hi] for key, lo, hi in zip(metrics, low.tolist(), high.tolist())}
    return row


def summarize(records: list[dict], resamples: int = 0) -> dict:
    """Overall and per-subset percentages: by collapsed_tag and by num_main_preds, as in the
    paper."""
    summary = {"all": percentages(records, resamples)}
    for key in ("collapsed_tag", "num_main_preds"):
        for value, group in grouped(records, key).items():
            summary[f"{key}={value}"] = percentages(group, resamples)
    return summary


def grouped(records: list[dict], key: str) -> dict:
    """The records by their value of `key`, in sorted order of the values."""
    groups = defaultdict(list)
    for record in records:
        groups[record[key]].append(record)
    return {value: groups[value] for value in sorted(groups)}


def mean_of_groups(groups: dict, resamples: int = 0) -> dict:
    """The mean of the groups' accuracies in %, each group weighing the same whatever its size (a
    SugarCrepe category, ARO's figure), with its stratified bootstrap interval."""
    credits = [[r["correct"] for r in group] for group in groups.values()]
    row = {"n": sum(map(len, credits)), "groups": len(credits),
           "correct": 100 * float(np.mean([np.mean(c) for c in credits]))}
    if resamples:
        row["ci95"] = {"correct": (100 * mean_of_groups_interval(credits, resamples)).tolist()}
    return row


def summarize_sugarcrepe(records: list[dict], resamples: int = 0) -> dict:
    """The accuracy per file, then per category (replace, swap, add) as the mean of its files'."""
    files = grouped(records, "file")
    summary = {f"file={f}": percentages(g, resamples, CHOICE) for f, g in files.items()}
    for category in ("replace", "swap", "add"):
        members = {f: g for f, g in files.items() if f.split("_")[0] == category}
        if members:
            summary[f"{category} (mean of {len(members)})"] = mean_of_groups(members, resamples)
    return summary


def summarize_aro(records: list[dict], resamples: int = 0) -> dict:
    """Per file, the mean over its groups (relations; attribute pairs with at least 25 items, as
    the authors' loader), then each group's accuracy."""
    summary = {}
    for file, items in grouped(records, "file").items():
        kind = "relation" if file.endswith("relation") else "attributes"
        groups = {s: g for s, g in grouped(items, "subset").items()
                  if len(g) >= MIN_GROUP_ITEMS[file]}
        if groups:
            summary[f"{file} (mean of {len(groups)})"] = mean_of_groups(groups, resamples)
        summary |= {f"{kind}={s}": percentages(g, resamples, CHOICE) for s, g in groups.items()}
    return summary


def format_table(summary: dict, title: str, metrics: tuple = METRICS) -> str:
    """One row per subset: n and each score, followed by its 95 % interval where the row has one."""
    # room for " [ 26.3,  35.3]"
    pad = " " * 15 if any("ci95" in row for row in summary.values()) else ""
    width = max(26, *(len(name) + 2 for name in summary))
    lines = [title, (f"{'subset':<{width}}{'n':>5}"
                     + "".join(f"{key:>8}{pad}" for key in metrics)).rstrip()]
    for name, row in summary.items():
        ci = row.get("ci95")
        cells = [f"{row[key]:>8.2f}" + (" [{:5.1f}, {:5.1f}]".format(*ci[key]) if ci else pad)
                 for key in metrics]
        lines.append(f"{name:<{width}}{row['n']:>5}" + "".join(cells))
    return "\n".join(lines)


def compare_runs(path_a: str | Path, path_b: str | Path,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Run B against run A on the same examples (matched by id): per score, both percentages, the
    difference B − A in points with its paired bootstrap 95 % interval, the discordant examples
    (right only in A, right only in B) and McNemar's exact p-value on them. The scores are
    Winoground's three credits, or SugarCrepe's and ARO's one ("correct", over all their items)."""
    a, b = read_pair(path_a, path_b)  # the same examples of the same data, or a ValueError
    ids = sorted(a.credits)
    check_resamples(resamples, len(ids))
    # (N, K) each: K = 3 credits for Winoground, 1 for SugarCrepe and ARO
    credit_a, credit_b = (np.array([run.credits[i] for i in ids], dtype=np.float64)
                          for run in (a, b))
    low, high = 100 * bootstrap_interval(credit_b - credit_a, resamples)
    n, metrics = len(ids), {}
    for k, key in enumerate(a.metrics):
        right_a, right_b = int(credit_a[:, k].sum()), int(credit_b[:, k].sum())
        only_a = int((credit_a[:, k] > credit_b[:, k]).sum())
        only_b = int((credit_b[:, k] > credit_a[:, k]).sum())
        metrics[key] = {"a": 100 * right_a / n, "b": 100 * right_b / n,
                        "difference": 100 * (right_b - right_a) / n,
                        "ci95": [float(low[k]), float(high[k])],
                        "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_p(only_a, only_b)}
    return {"benchmark": a.benchmark, "a": str(path_a), "b": str(path_b), "n": n,
            "bootstrap_resamples": resamples, "metrics": metrics}


def format_comparison(comparison: dict) -> str:
    name = BENCHMARKS[comparison["benchmark"]]
    lines = [f"{name}, B − A on {comparison['n']} examples scored by both: "
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
    add_benchmark_options(parser)
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


def add_benchmark_options(parser: argparse.ArgumentParser) -> None:
    """The two-caption benchmarks, scored instead of Winoground."""
    parser.add_argument("--sugarcrepe", metavar="DIR",
                        help="score SugarCrepe instead: the folder of its seven annotation files "
                             "(the data/ folder of github.com/RAIVNLab/sugar-crepe); with --images")
    parser.add_argument("--images", metavar="DIR",
                        help="--sugarcrepe: the folder of MS-COCO's val2017 images")
    parser.add_argument("--aro", metavar="DIR",
                        help="score ARO's VG-Relation and VG-Attribution instead: the folder of "
                             "visual_genome_relation.json, visual_genome_attribution.json and "
                             "images/")


def check_benchmark(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse's one-line error for benchmark options that do not go together."""
    # --data and --toy both name Winoground (--toy's own, unless --data is given)
    named = [flag for flag, value in (("--data", args.data), ("--toy", args.toy),
                                      ("--sugarcrepe", args.sugarcrepe), ("--aro", args.aro))
             if value]
    if len(named) > 1 and named[-1] in ("--sugarcrepe", "--aro"):
        parser.error(f"{' and '.join(named)} name different benchmarks; pass one of them")
    if args.compare and (args.sugarcrepe or args.aro or args.images):
        parser.error("--compare reads two saved runs; it takes no --sugarcrepe, --images or --aro")
    if (args.sugarcrepe is None) != (args.images is None) and not args.compare:
        parser.error("--sugarcrepe needs --images with the folder of COCO's val2017 images, and "
                     "--images goes with --sugarcrepe only")
    if (args.sugarcrepe or args.aro) and args.normalize_image_score:
        parser.error("--normalize_image_score judges Winoground's image retrieval; SugarCrepe and "
                     "ARO items have one image, so pass it without")


def run_inputs(args: argparse.Namespace) -> list:
    """The paths a run reads, which its --out must never replace."""
    if args.compare:
        return list(args.compare)
    models = [args.clip, args.sd, args.tokenizer]
    if args.sugarcrepe:
        return models + [Path(args.sugarcrepe) / f"{f}.json" for f in SUGARCREPE_FILES]
    if args.aro:
        return models + [Path(args.aro) / f"{f}.json" for f in ARO_FILES]
    return models + [args.data, Path(args.data) / "examples.jsonl",
                     Path(args.data) / "data" / "examples.jsonl"]


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
    check_benchmark(parser, args)
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
    if args.data is None and not (args.sugarcrepe or args.aro):
        args.data = DEFAULT_DATA
    if args.clip == "":
        args.clip = DEFAULT_CLIP
    if args.sd == "":
        args.sd = DEFAULT_SD
    if args.precision is None:  # as before --precision existed: the diffusion score in bf16 on CUDA
        args.precision = ("bf16" if args.sd is not None and torch.device(args.device).type == "cuda"
                          else "fp32")
    # the results file must never replace a file the run reads
    inputs = run_inputs(args)
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


def load_clip_scorer(args: argparse.Namespace, settings: dict) -> tuple:
    """--clip: the model, its tokenizer and its path, checked to fit each other; `settings` gains
    the run's."""
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
    settings |= {"scorer": "clip", "model": str(clip_path), "tokenizer": str(tokenizer_path),
                 "batch_size": args.batch_size or 32,
                 "score": "cosine similarity of the caption and image embeddings"}
    return model, tokenizer, clip_path


def score_clip(args: argparse.Namespace, data: Winoground, examples: list[Example],
               settings: dict) -> tuple:
    """--clip: the records of the cosine score, and the table's title; `settings` gains the
    run's."""
    model, tokenizer, clip_path = load_clip_scorer(args, settings)
    scores = clip_scores(model, tokenizer, data, examples, settings["batch_size"], args.device,
                         args.workers, args.precision)
    check_finite(scores, examples, f"CLIP {clip_path}")
    return score_examples(examples, scores), f"CLIP {clip_path}"


def load_sd_scorer(args: argparse.Namespace, settings: dict) -> tuple:
    """--sd: the model and the timestep grid, the resolution checked; `settings` gains the run's."""
    timesteps = timestep_grid(args.timesteps)
    sd = load_stable_diffusion(
        args.sd, args.device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    resolution = args.resolution or sd.resolution
    if resolution > MODEL_RESOLUTION_FACTOR * sd.resolution:
        raise ValueError(f"--resolution {resolution} is more than {MODEL_RESOLUTION_FACTOR} × "
                         f"the {sd.resolution} pixels of {args.sd}; pass --resolution "
                         f"{MODEL_RESOLUTION_FACTOR * sd.resolution} or less, or leave it out")
    settings |= {"scorer": "diffusion", "model": str(args.sd), "timesteps": timesteps.tolist(),
                 "seed": args.seed, "resolution": resolution, "batch_size": args.batch_size or 8,
                 "normalize_image_score": args.normalize_image_score,
                 "score": "minus the mean over timesteps of the denoising error "
                          "‖ε_θ(z_t, t, c) − ε‖²"}
    title = f"Stable Diffusion {args.sd}, {len(timesteps)} timesteps, seed {args.seed}"
    return sd, timesteps, title


def score_sd(args: argparse.Namespace, data: Winoground, examples: list[Example],
             settings: dict) -> tuple:
    """--sd: the diffusion score's records and the table's title; `settings` gains the run's."""
    sd, timesteps, title = load_sd_scorer(args, settings)
    errors = diffusion_errors(sd, data, examples, timesteps, args.seed, settings["batch_size"],
                              settings["resolution"], args.normalize_image_score, args.device,
                              args.workers, args.precision)  # (N, C, 2, T)
    check_finite(errors, examples, f"Stable Diffusion {args.sd}")
    scores = -errors[:, :2].mean(dim=-1)  # (N, 2, 2): s[c][i] = −E_t error
    image_scores = (-(errors[:, :2] - errors[:, 2:]).mean(dim=-1)
                    if args.normalize_image_score else None)
    records = score_examples(examples, scores, image_scores)
    return records, title + (", image score normalised" if args.normalize_image_score else "")


def score_choices(args: argparse.Namespace, data, items: list[Item], settings: dict) -> tuple:
    """SugarCrepe or ARO with --clip or --sd: each item's record, and the table's title."""
    if args.clip is not None:
        model, tokenizer, clip_path = load_clip_scorer(args, settings)
        scores = choice_clip_scores(model, tokenizer, data, items, settings["batch_size"],
                                    args.device, args.workers, args.precision)  # (N, 2)
        title = f"CLIP {clip_path}"
    else:
        sd, timesteps, title = load_sd_scorer(args, settings)
        errors = choice_diffusion_errors(sd, data, items, timesteps, args.seed,
                                         settings["batch_size"], settings["resolution"],
                                         args.device, args.workers, args.precision)  # (N, 2, T)
        scores = -errors.mean(dim=-1)  # s(c) = −E_t error, on the same noise for both captions
    check_finite(scores, items, title)
    return score_items(items, scores), title


def read_benchmark(args: argparse.Namespace) -> tuple:
    """The benchmark the command line names: its name, its reader and its examples or items."""
    if args.sugarcrepe:
        data = SugarCrepe(args.sugarcrepe, args.images)
        return "sugarcrepe", data, data.items
    if args.aro:
        data = ARO(args.aro)
        return "aro", data, data.items
    data = Winoground(args.data)
    return "winoground", data, data.examples


def default_model(args: argparse.Namespace) -> None:
    """--clip DEFAULT_CLIP when no model is named, if it is there; else what to do."""
    if args.clip is None and args.sd is None:
        if not Path(DEFAULT_CLIP).exists():
            raise FileNotFoundError(f"no model given and {DEFAULT_CLIP} not found — "
                                    f"{DOWNLOAD_HINT}, or pass --clip PATH or --sd PATH")
        args.clip = DEFAULT_CLIP
    elif args.clip == DEFAULT_CLIP and not Path(DEFAULT_CLIP).exists():  # a bare --clip
        raise FileNotFoundError(f"--clip takes a CLIP checkpoint folder or .safetensors file; "
                                f"without a path it means {DEFAULT_CLIP}, which is not there — "
                                f"{DOWNLOAD_HINT} or pass --clip PATH")


def evaluate(args: argparse.Namespace) -> dict:
    """Score the benchmark the command line names; returns the results.json content."""
    default_model(args)
    benchmark, data, examples = read_benchmark(args)
    examples = examples[: args.limit]
    check_resamples(args.bootstrap, len(examples))
    settings = {"benchmark": benchmark, "data": str(args.data or args.sugarcrepe or args.aro),
                "examples": len(examples), "device": args.device, "precision": args.precision,
                "bootstrap_resamples": args.bootstrap, "torch": torch.__version__}
    if benchmark != "winoground":
        settings |= {"images": str(args.images)} if args.images else {}
        records, title = score_choices(args, data, examples, settings)
    elif args.clip is not None:
        records, title = score_clip(args, data, examples, settings)
    else:
        records, title = score_sd(args, data, examples, settings)
    summarize_run, metrics, chance = {
        "winoground": (summarize, METRICS, "25 / 25 / 16.67"),
        "sugarcrepe": (summarize_sugarcrepe, CHOICE, "50"), "aro": (summarize_aro, CHOICE, "50")
    }[benchmark]
    try:
        summary = summarize_run(records, args.bootstrap)
    except BaseException:  # MemoryError, Ctrl-C: the scores took hours, the intervals take seconds
        if args.out:
            write_results({"settings": settings, "examples": records}, args.out)
        raise
    print(format_table(summary, f"{BENCHMARKS[benchmark]}, {title} ({len(records)} examples; "
                                f"chance {chance})", metrics))
    # Winoground's three scores over all examples; SugarCrepe's categories, ARO's two figures
    totals = summary["all"] if benchmark == "winoground" else {
        name: row for name, row in summary.items() if "(mean of" in name}
    return {"settings": settings, "totals": totals, "subsets": summary, "examples": records}


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

"""The teacher checked: the world's rule-based reader of its own pictures, the small SD's sampler
(DDIM with classifier-free guidance), and the checks of the small SD and CLIP on each split that
`python -m weights.toyworld --check` prints and weights/toy-models/models.json records.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip import CLIP, Tokenizer
# the scorers of eval_winoground.py, run in this process (the toy world sits on top of it)
from eval_winoground import clip_scores, diffusion_errors, score_examples, timestep_grid
from sds import NUM_TRAIN_TIMESTEPS, NoiseSchedule, StableDiffusion, encode_prompt
from unet import UNet
from vae import VAE
from weights.networks import load_clip, load_stable_diffusion, load_tokenizer, load_unet, load_vae
from weights.winoground import Winoground

from .world import COLOURS, IMAGE_SIZE, TAGS, as_pixels, clip_pixels, read_split, sheet, to_pil
from .world import vae_pixels

# ----------------------------------------------------------------------------- phase 6: check the teacher

# a pixel this close to a palette colour (RGB distance) is read as that colour
READER_DISTANCE = 60.0
READER_MIN_PIXELS = 4  # a half with fewer such pixels holds no object
GUIDANCE = 4.0  # classifier-free guidance scale of the sampler (chosen on val)
SAMPLE_STEPS = 25  # DDIM steps
CHECK_TIMESTEPS = 100  # the diffusion score's timesteps in the checks


def read_colours(image: Image.Image, axis: str) -> tuple[str | None, str | None]:
    """A rule-based reader of the world's own pictures: the palette colour with the most pixels in
    each half (left and right for axis "h", top and bottom for "v"), None for a half without one."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    distance = np.linalg.norm(pixels[:, :, None] - np.array(list(COLOURS.values()), np.float32),
                              axis=-1)
    # (H, W): a colour or -1
    nearest = np.where(distance.min(-1) < READER_DISTANCE, distance.argmin(-1), -1)
    if axis == "v":
        nearest = nearest.T  # top and bottom become left and right
    halves = []
    for half in (nearest[:, : IMAGE_SIZE // 2], nearest[:, IMAGE_SIZE // 2 :]):
        counts = np.bincount(half[half >= 0], minlength=len(COLOURS))
        halves.append(list(COLOURS)[counts.argmax()] if counts.max() >= READER_MIN_PIXELS else None)
    return halves[0], halves[1]


def placed_right(image: Image.Image, scene: dict) -> bool:
    """Both objects' colours where the scene puts them."""
    return read_colours(image, scene["axis"]) == (scene["first"][0], scene["second"][0])


@torch.no_grad()
def sample(unet: UNet, vae: VAE, text_encoder: CLIP, tokenizer: Tokenizer, captions: list[str],
           guidance: float = GUIDANCE, steps: int = SAMPLE_STEPS, seed: int = 0) -> torch.Tensor:
    """Images for `captions`, (B, 3, H, W) in [-1, 1]: DDIM (Song et al. 2021, η = 0) with
    classifier-free guidance (Ho & Salimans 2022), the empty prompt as the unconditional model."""
    a = NoiseSchedule().alphas_cumprod  # ᾱ_t
    context = encode_prompt(text_encoder, tokenizer, captions + [""])  # (B + 1, 77, D)
    # c rows, then the empty prompt
    context = torch.cat([context[:-1], context[-1:].expand(len(captions), -1, -1)])
    size = unet.config.sample_size
    z = torch.randn((len(captions), unet.config.in_channels, size, size),
                    generator=torch.Generator().manual_seed(seed))
    timesteps = torch.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps).round().long()
    for k, t in enumerate(timesteps):
        eps_c, eps_u = unet(torch.cat([z, z]), t.repeat(2 * len(z)), context).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)  # ε̂ = ε_u + s (ε_c − ε_u)
        x0 = (z - (1 - a[t]).sqrt() * eps) / a[t].sqrt()  # x̂_0 = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
        a_next = a[timesteps[k + 1]] if k + 1 < steps else torch.tensor(1.0)
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps  # z_t' = √ᾱ_t' x̂_0 + √(1−ᾱ_t') ε̂
    return vae.latents_to_images(z)


def group_by_tag(records: list[dict]) -> dict[str, float]:
    return {tag: 100 * float(np.mean([r["group"] for r in records if r["collapsed_tag"] == tag]))
            for tag in TAGS if any(r["collapsed_tag"] == tag for r in records)}


def check_teacher(paths: dict[str, Path], splits=("val", "test", "new_objects"),
                  timesteps: int = CHECK_TIMESTEPS, guidance: float = GUIDANCE,
                  seed: int = 0) -> dict:
    """The small SD and CLIP checked on each split: the reader on the real images, the VAE's
    reconstructions (PSNR, reader), samples of every caption (reader), the diffusion score with
    `timesteps` shared-noise timesteps (group per tag, plain and normalised; 0: not computed), and
    CLIP's scores and image→caption R@1 among the split's distinct captions. Printed and
    returned."""
    sd = load_stable_diffusion(paths["sd"])
    clip, tokenizer = load_clip(paths["clip"]), load_tokenizer(paths["clip"])
    checks = {}
    for split in splits:
        examples, scenes, images = read_split(paths[split])
        truth = [scenes[e[f"image_{k}"]] for e in examples for k in range(2)]
        captions = [e[f"caption_{k}"] for e in examples for k in range(2)]
        recon, mse, samples = reconstruct_and_sample(sd, images, captions, guidance, seed)
        data = Winoground(paths[split])
        clip_records = score_examples(data.examples,
                                      clip_scores(clip, tokenizer, data, data.examples))
        # image 2n + k: caption k of example n
        drawn = [placed_right(im, s) for im, s in zip(to_pil(samples), truth)]
        recall_scene, recall_objects = caption_recall(clip, tokenizer, images, captions, truth)
        checks[split] = {
            "reader on real images": 100 * float(np.mean([placed_right(im, s)
                                                          for im, s in zip(images, truth)])),
            "VAE PSNR (dB)": float(-10 * torch.log10(mse)),
            "reader on VAE reconstructions": 100 * float(np.mean([placed_right(im, s)
                                                                  for im, s in zip(to_pil(recon),
                                                                                   truth)])),
            "reader on samples": 100 * float(np.mean(drawn)),
            "reader on samples, per tag": per_tag(drawn, examples),
            "CLIP group per tag": group_by_tag(clip_records),
            "CLIP image→caption R@1, scene": recall_scene,
            "CLIP image→caption R@1, objects": recall_objects,
        }
        if timesteps:  # the costly part: 3 prompts × 2 images × timesteps UNet calls per example
            checks[split] |= diffusion_checks(sd, data, timesteps, seed)
        print(f"{split}: " + "; ".join(f"{k} {v:.1f}" if isinstance(v, float) else
                                        f"{k} " + " / ".join(f"{t} {x:.1f}" for t, x in v.items())
                                        for k, v in checks[split].items()), flush=True)
    return checks


def reconstruct_and_sample(sd: StableDiffusion, images: list[Image.Image], captions: list[str],
                           guidance: float,
                           seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VAE's reconstructions of the images (B, 3, H, W) and their mean squared error on [0, 1];
    a sample of each caption, drawn 256 at a time (a chunk at i from seed + i)."""
    real = as_pixels(images)
    with torch.no_grad():
        recon = torch.cat([sd.vae.decode(sd.vae.encode(vae_pixels(p)).mean)
                           for p in real.split(256)])
    mse = ((recon.clamp(-1, 1) - vae_pixels(real)) / 2).pow(2).mean()  # on [0, 1]
    samples = torch.cat([sample(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer,
                                captions[i:i + 256], guidance,
                                seed=seed + i) for i in range(0, len(captions), 256)])
    return recon, mse, samples


def per_tag(right: list[bool], examples: list[dict]) -> dict[str, float]:
    """Per tag, the share (%) of the images of its examples that are `right` (image 2n + k belongs
    to example n)."""
    return {tag: 100 * float(np.mean([r for n, r in enumerate(right)
                                      if examples[n // 2]["collapsed_tag"] == tag]))
            for tag in TAGS}


def diffusion_checks(sd: StableDiffusion, data, timesteps: int,
                     seed: int) -> dict[str, dict[str, float]]:
    """The diffusion score's group per tag on `data` (a Winoground split), `timesteps` grid
    timesteps with noise shared by the captions: plain, and with the image score normalised by the
    empty prompt's error."""

    errors = diffusion_errors(sd, data, data.examples, timestep_grid(timesteps), seed=seed,
                              batch_size=600, unconditional=True)  # (N, 3, 2, T)
    plain = -errors[:, :2].mean(-1)  # s(c, i) = −E_t ‖ε_θ(z_t, t, c) − ε‖²
    normalised = -(errors[:, :2] - errors[:, 2:]).mean(-1)  # minus the empty prompt's error
    return {"diffusion group per tag": group_by_tag(score_examples(data.examples, plain)),
            "diffusion group per tag, image score normalised": group_by_tag(
                score_examples(data.examples, plain, normalised))}


@torch.no_grad()
def caption_recall(clip: CLIP, tokenizer: Tokenizer, images: list[Image.Image], captions: list[str],
                   truth: list[dict]) -> tuple[float, float]:
    """Image → caption R@1 (%) among the distinct `captions` (caption i is one of image i's, and
    truth[i] its scene): the nearest caption describes the image's scene (any paraphrase counts);
    and, the base skill an order-blind model can have, it names the image's two objects."""
    scene_of = {caption: scene for caption, scene in zip(captions, truth)}
    texts = sorted(scene_of)
    pixels = clip_pixels(as_pixels(images))
    image_embeds = F.normalize(clip.encode_image(pixels), dim=-1)
    text_embeds = F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)
    found = [scene_of[texts[b]] for b in (image_embeds @ text_embeds.T).argmax(-1).tolist()]

    def objects(scene):
        return {tuple(scene["first"]), tuple(scene["second"])}

    return (100 * float(np.mean([f == s for f, s in zip(found, truth)])),
            100 * float(np.mean([objects(f) == objects(s) for f, s in zip(found, truth)])))


# ----------------------------------------------------------------------------- figures


def samples_sheet(paths: dict[str, Path], file: Path, count: int = 12,
                  guidance: float = GUIDANCE) -> None:
    """The captions of the first test examples: the real image above the small SD's sample."""
    examples, _, images = read_split(paths["test"])
    sd = {"unet": load_unet(paths["sd"] / "unet"), "vae": load_vae(paths["sd"] / "vae"),
          "text_encoder": load_clip(paths["sd"] / "text_encoder"),
          "tokenizer": load_tokenizer(paths["sd"] / "tokenizer")}
    captions = [e["caption_0"] for e in examples[:count]]
    drawn = to_pil(sample(**sd, captions=captions, guidance=guidance))
    sheet([[(images[2 * n], f"real: {c}"), (drawn[n], "sampled")] for n, c in enumerate(captions)],
          file)

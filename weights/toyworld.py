"""A toy compositional world in which the whole SDS-CLIP method runs on a CPU in minutes.

Pictures of two coloured shapes side by side or one above the other ("a red circle to the
left of a blue square"), captioned by a small grammar; a small CLIP and a small Stable
Diffusion trained from scratch on them with this project's own modules and written in the
official layouts, so that train.py and eval_winoground.py read them exactly as they read
downloaded weights. It is a world for watching the method work and for measuring what the
SDS term does beside a control; it is not a benchmark of real CLIPs.

    python weights/toyworld.py            # ≈ 15 min on 2 CPU cores, cached in weights/toy/
    python weights/toyworld.py --quick    # a small functional build in under a minute (tests)
    python train.py --toy                 # builds it if missing, then runs SDS-CLIP on it

What it writes (every file in its usual layout):
    data/train/   MS-COCO 2017 layout: train2017/*.png + annotations/captions_train2017.json
    data/val/     Winoground layout: examples.jsonl + images/  (to choose settings)
    data/test/    Winoground layout, ≥ 400 examples             (to report)
    clip/         Hugging Face CLIP: config.json, model.safetensors, vocab.json, merges.txt
    sd/           diffusers Stable Diffusion: model_index.json, scheduler/, tokenizer/,
                  text_encoder/ (the small CLIP's text tower, as SD 1.x uses OpenAI's), vae/, unet/
    contact_sheet.png, build.json (settings and the time of each phase)

The Winoground-style examples hold two images and two captions with the same words in a
different order: the colours swapped between the two objects ("attribute", binding), the
objects swapped around the relation ("object"), or the relation words swapped between the
objects ("relation"). Their colour–shape combinations never occur in training.
"""

import argparse
import json
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

if not __package__:  # run as a script, `python weights/toyworld.py`: the project's modules sit one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clip import CLIP, EOT, OPENAI_MEAN, OPENAI_STD, SOT, CLIPConfig, TextConfig, Tokenizer, VisionConfig  # noqa: E402
from clip import bytes_to_unicode, clean_text, merge_pair, save_clip  # noqa: E402
from sds import NoiseSchedule, contrastive_loss, encode_prompt  # noqa: E402
from unet import UNet, UNetConfig, save_unet  # noqa: E402
from vae import VAE, VAEConfig, save_vae  # noqa: E402

TOY_DIR = Path(__file__).resolve().parent / "toy"
VERSION = 1  # bump when the recipe changes, so that a cached build is rebuilt

# ----------------------------------------------------------------------------- the world

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 220), "yellow": (235, 195, 25),
           "purple": (135, 55, 175)}
SHAPES = ("circle", "square", "triangle", "cross")
# Never in training: two blocks of 2 colours × 2 shapes. A block is closed under swapping the
# colours of two of its objects, so an attribute-swap example stays inside the held-out set.
HELD_OUT_BLOCKS = ((("red", "blue"), ("circle", "square")), (("green", "yellow"), ("triangle", "cross")))
HELD_OUT = {(c, s) for colours, shapes in HELD_OUT_BLOCKS for c in colours for s in shapes}
TRAIN_OBJECTS = sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)
IMAGE_SIZE = 32  # pixels; CLIP sees 8 × 8 patches of 4 pixels, the VAE makes 8 × 8 latents
SUPERSAMPLE = 8  # draw at 8× and downsample: anti-aliased edges

# Captions. A is the object on the left (or at the top), B the other; "{A}" is "a red circle".
RELATIONAL = {  # one relation between two noun phrases
    "h": ("{A} to the left of {B}", "{B} to the right of {A}", "{A} left of {B}", "{B} right of {A}"),
    "v": ("{A} above {B}", "{B} below {A}", "{A} on top of {B}", "{B} under {A}"),
}
CLAUSES = {  # one place word per object: swapping the place words swaps the relation
    "h": ("{A} on the left and {B} on the right", "{B} on the right and {A} on the left"),
    "v": ("{A} at the top and {B} at the bottom", "{B} at the bottom and {A} at the top"),
}
PREFIXES = ("", "", "a picture of ", "an image of ", "there is ")
ARTICLES = ("a", "the")
CAPTIONS_PER_IMAGE = 5  # as MS-COCO


@dataclass
class Scene:
    first: tuple[str, str]  # (colour, shape) on the left, or at the top
    second: tuple[str, str]
    axis: str  # "h": side by side; "v": one above the other


def noun(obj: tuple[str, str], article: str = "a") -> str:
    return f"{article} {obj[0]} {obj[1]}"


def describe(scene: Scene, template: str, article: str = "a", prefix: str = "") -> str:
    return prefix + template.format(A=noun(scene.first, article), B=noun(scene.second, article))


def draw(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene with jitter: background shade, sizes, positions along both axes, colours."""
    s = SUPERSAMPLE
    shade = int(rng.integers(225, 250))
    image = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (shade, shade, shade))
    pen = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    for slot, (colour, shape) in enumerate((scene.first, scene.second)):
        size = rng.uniform(0.45, 0.7) * half
        along = rng.uniform(size / 2, half - size / 2) + slot * half  # its own half along the axis
        across = rng.uniform(size / 2, IMAGE_SIZE - size / 2)
        x, y = (along, across) if scene.axis == "h" else (across, along)
        fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
        x0, y0, x1, y1 = (x - size / 2) * s, (y - size / 2) * s, (x + size / 2) * s, (y + size / 2) * s
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            pen.polygon([(x * s, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross: a plus sign whose arms are a third of its size
            arm = size * s / 6
            pen.rectangle((x * s - arm, y0, x * s + arm, y1), fill=fill)
            pen.rectangle((x0, y * s - arm, x1, y * s + arm), fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def random_scene(rng: np.random.Generator, objects: list[tuple[str, str]]) -> Scene:
    """Two objects of different colour and shape, in a random arrangement."""
    while True:
        a, b = (objects[i] for i in rng.choice(len(objects), 2, replace=False))
        if a[0] != b[0] and a[1] != b[1]:
            return Scene(a, b, str(rng.choice(["h", "v"])))


def train_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    templates = RELATIONAL[scene.axis] + CLAUSES[scene.axis]
    return [describe(scene, templates[rng.integers(len(templates))], ARTICLES[rng.integers(2)],
                     PREFIXES[rng.integers(len(PREFIXES))]) for _ in range(CAPTIONS_PER_IMAGE)]


def swap_example(tag: str, rng: np.random.Generator) -> tuple[Scene, Scene, str, str]:
    """Two scenes and two captions with the same words in a different order, held-out objects only."""
    if tag == "attribute":  # "a red circle left of a blue square" / "a blue circle left of a red square"
        colours, shapes = HELD_OUT_BLOCKS[rng.integers(len(HELD_OUT_BLOCKS))]
        c, s = rng.permutation(colours), rng.permutation(shapes)
        scene = Scene((c[0], s[0]), (c[1], s[1]), str(rng.choice(["h", "v"])))
        swapped = Scene((c[1], s[0]), (c[0], s[1]), scene.axis)
    else:  # the same two objects, their places exchanged
        scene = random_scene(rng, sorted(HELD_OUT))
        swapped = Scene(scene.second, scene.first, scene.axis)
    if tag == "relation":  # "a red circle on the left and a blue square on the right" / "… on the right … left"
        place = {"h": ("on the left", "on the right"), "v": ("at the top", "at the bottom")}[scene.axis]
        caption_0 = f"{noun(scene.first)} {place[0]} and {noun(scene.second)} {place[1]}"
        caption_1 = f"{noun(scene.first)} {place[1]} and {noun(scene.second)} {place[0]}"
    else:  # attribute, object: one relational template, filled from each scene
        template = RELATIONAL[scene.axis][rng.integers(len(RELATIONAL[scene.axis]))]
        caption_0, caption_1 = describe(scene, template), describe(swapped, template)
    return scene, swapped, caption_0, caption_1


# ----------------------------------------------------------------------------- sizes and budgets


@dataclass
class Recipe:
    train_images: int = 12_000
    val_examples: int = 240  # per tag: a third
    test_examples: int = 480
    clip_steps: int = 800
    clip_batch: int = 128
    vae_steps: int = 300
    vae_batch: int = 32
    unet_steps: int = 3000
    unet_batch: int = 64


QUICK = Recipe(train_images=256, val_examples=12, test_examples=12, clip_steps=10, clip_batch=32, vae_steps=5,
               vae_batch=8, unet_steps=10, unet_batch=16)
TAGS = ("attribute", "object", "relation")

CLIP_CONFIG = CLIPConfig(
    text=TextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2),
    vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                        image_size=IMAGE_SIZE, patch_size=4),
    projection_dim=64,
)
VAE_CONFIG = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)  # 32 px → 8 × 8
UNET_CONFIG = UNetConfig(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, norm_num_groups=8,
)
CAPTION_DROP = 0.1  # the UNet sees the empty prompt this often, so that it means "any image"

# train.py --toy: the settings of the SDS-CLIP run on this world (README: why they differ from the paper's).
TRAIN_DEFAULTS = {"epochs": 1, "batch_size": 32, "lr": 1e-3, "sds_weight": 1.0, "sds_mode": "full",
                  "num_workers": 0, "save_every": 0}


# ----------------------------------------------------------------------------- phase 1: the data


def write_train(root: Path, n: int, rng: np.random.Generator) -> None:
    """MS-COCO 2017 layout: train2017/<id>.png and annotations/captions_train2017.json."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id in tqdm(range(1, n + 1), desc="draw train", unit="image"):
        scene = random_scene(rng, TRAIN_OBJECTS)
        name = f"{image_id:012d}.png"
        draw(scene, rng).save(root / "train2017" / name)
        images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for caption in train_captions(scene, rng):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    data = {"info": {"description": "SDS-CLIP toy world"}, "images": images, "annotations": annotations}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(data))


def write_winoground(root: Path, n: int, rng: np.random.Generator) -> None:
    """Winoground layout: examples.jsonl and images/ex_<id>_img_<0|1>.png, tags cycling through TAGS."""
    (root / "images").mkdir(parents=True)
    with open(root / "examples.jsonl", "w") as f:
        for i in tqdm(range(n), desc=f"draw {root.name}", unit="example"):
            tag = TAGS[i % len(TAGS)]
            scene_0, scene_1, caption_0, caption_1 = swap_example(tag, rng)
            for k, scene in enumerate((scene_0, scene_1)):
                draw(scene, rng).save(root / "images" / f"ex_{i}_img_{k}.png")
            f.write(json.dumps({"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1",
                                "caption_0": caption_0, "caption_1": caption_1, "tag": tag,
                                "secondary_tag": "", "num_main_preds": 2 if tag == "relation" else 1,
                                "collapsed_tag": tag}) + "\n")


def draw_data(root: Path, recipe: Recipe, seed: int) -> None:
    # One generator per split: the splits do not depend on each other's sizes.
    write_train(root / "train", recipe.train_images, np.random.default_rng([seed, 0]))
    write_winoground(root / "val", recipe.val_examples, np.random.default_rng([seed, 1]))
    write_winoground(root / "test", recipe.test_examples, np.random.default_rng([seed, 2]))


# ----------------------------------------------------------------------------- phase 2: the tokenizer


def learn_bpe(texts: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016) until every word of `texts` is one token: count the
    adjacent symbol pairs over all words, merge the most frequent, repeat."""
    byte_encoder = bytes_to_unicode()
    words = Counter()
    for text in texts:
        for word in Tokenizer.PATTERN.findall(clean_text(text)):
            chars = [byte_encoder[b] for b in word.encode("utf-8")]
            words[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    merges = []
    while True:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = max(sorted(pairs), key=pairs.__getitem__)  # most frequent; ties: the first in sorted order
        merges.append(best)
        words = {tuple(merge_pair(word, best)): count for word, count in words.items()}


def write_tokenizer(folders: list[Path], texts: list[str]) -> Tokenizer:
    """vocab.json + merges.txt as OpenAI's vocabulary is laid out: the 256 byte symbols, the same
    with </w>, one token per merge, then the start and end tokens. SD's tokenizer pads with EOT."""
    merges = learn_bpe(texts)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    encoder = {token: i for i, token in enumerate(vocab)}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": SOT, "eos_token": EOT,
              "unk_token": EOT, "pad_token": EOT, "do_lower_case": True}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                           encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2) + "\n")
    return Tokenizer(encoder, merges)


# ----------------------------------------------------------------------------- the training phases


@dataclass
class TrainSet:
    pixels: torch.Tensor  # (N, 3, 32, 32) uint8
    captions: list[list[str]]

    @classmethod
    def read(cls, root: Path) -> "TrainSet":
        data = json.loads((root / "annotations" / "captions_train2017.json").read_text())
        captions = {im["id"]: [] for im in data["images"]}
        for ann in data["annotations"]:
            captions[ann["image_id"]].append(ann["caption"])
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(root / "train2017" / im["file_name"])).copy())
                              for im in data["images"]]).permute(0, 3, 1, 2)
        return cls(pixels.contiguous(), [captions[im["id"]] for im in data["images"]])

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, list[str]]:
        """A random batch: uint8 pixels and one of each image's captions."""
        index = rng.choice(len(self.captions), size, replace=False)
        return self.pixels[index], [self.captions[i][rng.integers(len(self.captions[i]))] for i in index]


def clip_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, 32, 32) → CLIP's input, exactly clip.image_transform(32) of the PNG (no resize needed)."""
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def vae_pixels(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1  # [0, 255] → [-1, 1], the VAE's range


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def optimise(model_params, steps: int, peak_lr: float, loss_fn, desc: str, weight_decay: float = 0.0):
    """AdamW with warm-up and cosine decay; loss_fn(step) returns the loss of one batch."""
    optimizer = torch.optim.AdamW(model_params, lr=peak_lr, weight_decay=weight_decay)
    progress = tqdm(range(steps), desc=desc, unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, peak_lr)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()


def pretrain_clip(train: TrainSet, tokenizer: Tokenizer, recipe: Recipe, seed: int) -> CLIP:
    """CLIP's contrastive pre-training (Radford et al. 2021) on the train split: one random caption
    per image, symmetric InfoNCE over the batch."""
    torch.manual_seed(seed)
    config = CLIPConfig(text=TextConfig(**{**vars(CLIP_CONFIG.text), "vocab_size": len(tokenizer.encoder),
                                           "eos_token_id": tokenizer.eot_id}),
                        vision=CLIP_CONFIG.vision, projection_dim=CLIP_CONFIG.projection_dim)
    model = CLIP(config).train()
    rng = np.random.default_rng([seed, 10])

    def loss_fn(step):
        pixels, captions = train.batch(rng, recipe.clip_batch)
        return contrastive_loss(model(clip_pixels(pixels), tokenizer(captions)))  # logits_per_image (B, B)

    params = list(model.parameters())
    optimise(params, recipe.clip_steps, 1e-3, loss_fn, "pre-train CLIP", weight_decay=0.05)
    return model.eval()


def train_vae(train: TrainSet, recipe: Recipe, seed: int) -> VAE:
    """An autoencoder with a KL-regularised latent (Rombach et al. 2022): reconstruction error plus a
    small KL term; then `scaling_factor` = 1 / std of the latents of a batch of training images,
    which is how SD's 0.18215 was measured."""
    torch.manual_seed(seed)
    vae = VAE(VAE_CONFIG).train()
    rng = np.random.default_rng([seed, 20])
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        x = vae_pixels(train.batch(rng, recipe.vae_batch)[0])
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(generator))
        kl = 0.5 * (posterior.mean.pow(2) + posterior.std.pow(2) - 1 - posterior.logvar).mean()
        return F.mse_loss(recon, x) + 1e-4 * kl

    optimise(list(vae.parameters()), recipe.vae_steps, 2e-3, loss_fn, "train VAE")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(vae_pixels(train.pixels[:512])).sample(generator)
    vae.config.scaling_factor = float(1 / latents.std())
    return vae


def train_unet(train: TrainSet, vae: VAE, text_encoder: CLIP, tokenizer: Tokenizer, recipe: Recipe,
               seed: int) -> UNet:
    """ε-prediction (Ho et al. 2020) on the VAE's scaled latents with SD 1.x's noise schedule,
    conditioned on the text encoder's last hidden state; the caption is dropped CAPTION_DROP of
    the time, so that the empty prompt conditions the unconditional model."""
    torch.manual_seed(seed)
    unet = UNet(UNET_CONFIG).train()
    schedule = NoiseSchedule()
    rng = np.random.default_rng([seed, 30])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the posterior of every training image, once
        moments = [vae.encode(vae_pixels(p)) for p in train.pixels.split(256)]
        mean = torch.cat([m.mean for m in moments])
        std = torch.cat([m.std for m in moments])

    def loss_fn(step):
        index = torch.from_numpy(rng.choice(len(train.captions), recipe.unet_batch, replace=False))
        captions = [train.captions[i][rng.integers(len(train.captions[i]))] if rng.random() >= CAPTION_DROP else ""
                    for i in index.tolist()]
        z0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator))
        z0 = z0 * vae.config.scaling_factor  # z_0: a latent sample × scaling_factor
        with torch.no_grad():
            context = encode_prompt(text_encoder, tokenizer, captions)  # c: SD's conditioning, (B, 77, 64)
        t = schedule.sample_timesteps(len(index), generator)  # t ~ U{0, …, 999}
        noise = torch.randn(z0.shape, generator=generator)  # ε ~ N(0, I)
        z_t = schedule.add_noise(z0, noise, t)  # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
        return F.mse_loss(unet(z_t, t, context), noise)  # ‖ε_θ(z_t, t, c) − ε‖²

    optimise(list(unet.parameters()), recipe.unet_steps, 1e-3, loss_fn, "train UNet")
    return unet.eval()


def text_tower(clip: CLIP) -> CLIP:
    """The CLIP's text tower alone, as a CLIPTextModel (SD's text_encoder/)."""
    encoder = CLIP(CLIPConfig(text=clip.config.text, projection_dim=None))
    encoder.text_model.load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


def write_sd(folder: Path, text_encoder: CLIP, vae: VAE, unet: UNet, tokenizer_dir: Path) -> None:
    """A diffusers StableDiffusionPipeline folder."""
    save_clip(text_encoder, folder / "text_encoder")
    save_vae(vae, folder / "vae")
    save_unet(unet, folder / "unet")
    shutil.copytree(tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False},
        indent=2) + "\n")


def contact_sheet(root: Path, file: Path, columns: int = 4, rows: int = 3) -> None:
    """The first test examples, one per column: image 0 over image 1, each under its caption."""
    examples = [json.loads(line) for line in (root / "examples.jsonl").read_text().splitlines()]
    examples = examples[: columns * rows]
    side, text_h, width = 4 * IMAGE_SIZE, 48, 4 * IMAGE_SIZE + 40
    height = 2 * (side + text_h)
    sheet = Image.new("RGB", (columns * width, -(-len(examples) // columns) * height), "white")
    pen = ImageDraw.Draw(sheet)
    for n, example in enumerate(examples):
        x, y = (n % columns) * width + 4, (n // columns) * height
        for k in range(2):
            image = Image.open(root / "images" / f"{example[f'image_{k}']}.png")
            sheet.paste(image.resize((side, side), Image.NEAREST), (x, y + 4))
            lines, line = [], f"[{example['tag']}]" if k == 0 else ""
            for word in example[f"caption_{k}"].split():  # wrap the caption to the cell's width
                if line and pen.textlength(f"{line} {word}") > width - 8:
                    lines, line = lines + [line], word
                else:
                    line = f"{line} {word}".strip()
            pen.multiline_text((x, y + side + 6), "\n".join(lines + [line]), fill="black", spacing=2)
            y += side + text_h
    sheet.save(file)


# ----------------------------------------------------------------------------- the recipe


def build(out: Path = TOY_DIR, seed: int = 0, quick: bool = False, recipe: Recipe | None = None) -> dict[str, Path]:
    """Build the world into `out` (or reuse a complete build with the same settings); return its paths."""
    out = Path(out)
    paths = {"train": out / "data" / "train", "val": out / "data" / "val", "test": out / "data" / "test",
             "clip": out / "clip", "sd": out / "sd"}
    recipe = recipe or (QUICK if quick else Recipe())
    settings = {"version": VERSION, "seed": seed, "quick": quick, "recipe": vars(recipe)}
    marker = out / "build.json"
    if marker.is_file() and {k: v for k, v in json.loads(marker.read_text()).items() if k in settings} == settings:
        return paths
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    times = {}
    torch_threads = torch.get_num_threads()
    print(f"building the toy world in {out} (seed {seed}{', quick' if quick else ''}; cached afterwards)")

    def phase(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        times[name] = round(time.perf_counter() - start, 1)
        return result

    phase("draw the data", draw_data, out / "data", recipe, seed)
    train = TrainSet.read(paths["train"])
    tokenizer = phase("write the tokenizer", write_tokenizer, [paths["clip"], paths["sd"] / "tokenizer"],
                      [c for cs in train.captions for c in cs])
    clip = phase("pre-train CLIP", pretrain_clip, train, tokenizer, recipe, seed)
    save_clip(clip, paths["clip"])
    text_encoder = text_tower(clip)
    vae = phase("train the VAE", train_vae, train, recipe, seed)
    unet = phase("train the UNet", train_unet, train, vae, text_encoder, tokenizer, recipe, seed)
    write_sd(paths["sd"], text_encoder, vae, unet, paths["clip"])
    contact_sheet(paths["test"], out / "contact_sheet.png")
    marker.write_text(json.dumps({**settings, "torch_threads": torch_threads, "seconds": times,
                                  "total_seconds": round(sum(times.values()), 1)}, indent=2) + "\n")
    print("built: " + ", ".join(f"{name} {s:.0f} s" for name, s in times.items())
          + f"; see {out / 'contact_sheet.png'}")
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(TOY_DIR), help="where to build (default: weights/toy)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and every model's training")
    parser.add_argument("--quick", action="store_true", help="a small functional build in under a minute (tests)")
    args = parser.parse_args()
    build(Path(args.out), args.seed, args.quick)

"""A toy compositional world in which the whole SDS-CLIP method runs on a CPU in minutes.

Pictures of two coloured shapes side by side or one above the other ("a red circle to the
left of a blue square"), captioned by a small grammar; a small CLIP and a small Stable
Diffusion trained from scratch on them with this project's own modules and written in the
official layouts, so that train.py and eval_winoground.py read them exactly as they read
downloaded weights. It is a world for watching the method work and for measuring what the
SDS term does beside a control; it is not a benchmark of real CLIPs.

    python weights/toyworld.py                # draw the data (≈ 15 s) beside the shipped models
    python weights/toyworld.py --check        # … and print the teacher's checks (≈ 25 min)
    python weights/toyworld.py --rebuild      # train every model from scratch (≈ 50 min), then check
    python weights/toyworld.py --quick --out DIR  # a small functional build in a minute (tests)
    python train.py --toy                     # draws the data if missing, then runs SDS-CLIP on it

The trained models ship in weights/toy-models/ (clip/, sd/ and models.json: the recipe, the
sha256 of every file, torch's version, each phase's time and the checks), made by
`--rebuild --seed 0`. The data is drawn again, deterministically, into weights/toy/data/:
    train/              MS-COCO 2017 layout: train2017/*.png + annotations/captions_train2017.json
    val/, test/         Winoground layout (examples.jsonl + images/): the main splits
    test-new-objects/   Winoground layout: the harder second split
and scenes.json in each, the ground truth of every image (the objects and their places).

Like Winoground, the main splits ask about familiar things in new arrangements. Every object
(a colour–shape pair) of val and test is seen in training; what is new is the pairing: which
two objects appear together. The pairings of val and test never occur in training, so neither
image of an example has been seen. Each example holds two images and two captions with the
same words in a different order: the colours swapped between the two objects ("attribute",
binding), the objects swapped around the relation ("object"), or the relation words swapped
between the objects ("relation"). The second split, test-new-objects, asks the same about
four objects that never occur in training at all.
"""

import argparse
import hashlib
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
from clip import bytes_to_unicode, clean_text, load_clip, merge_pair, save_clip  # noqa: E402
from sds import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, NoiseSchedule, contrastive_loss  # noqa: E402
from sds import encode_prompt  # noqa: E402
from unet import UNet, UNetConfig, load_unet, save_unet  # noqa: E402
from vae import VAE, VAEConfig, load_vae, save_vae  # noqa: E402

TOY_DIR = Path(__file__).resolve().parent / "toy"  # the drawn data (and --quick builds), not in git
MODELS_DIR = Path(__file__).resolve().parent / "toy-models"  # the shipped models, in git
VERSION = 3  # bump when the recipe changes, so that cached data is drawn again

# ----------------------------------------------------------------------------- the world

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 220), "yellow": (235, 195, 25),
           "purple": (135, 55, 175), "cyan": (30, 190, 200), "pink": (240, 110, 200), "brown": (140, 90, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
# A block, 2 colours × 2 shapes, holds two pairings of objects: {red circle, blue square} and
# {blue circle, red square}. Every swap (colours, places, relation words) maps a scene of a block
# into the same block, so a split drawn from blocks never needs a pairing outside them.
NEW_OBJECT_BLOCK = (("red", "blue"), ("circle", "square"))  # test-new-objects: these 4 objects never in training
VAL_BLOCKS = ((("yellow", "purple"), ("circle", "cross")), (("green", "cyan"), ("square", "triangle")),
              (("red", "pink"), ("triangle", "cross")), (("blue", "brown"), ("triangle", "cross")),
              (("cyan", "brown"), ("circle", "square")), (("green", "pink"), ("circle", "cross")))
TEST_BLOCKS = ((("green", "yellow"), ("circle", "triangle")), (("purple", "cyan"), ("square", "cross")),
               (("red", "brown"), ("triangle", "cross")), (("blue", "yellow"), ("triangle", "cross")),
               (("pink", "cyan"), ("circle", "square")), (("purple", "brown"), ("circle", "triangle")))
NEW_OBJECTS = {(c, s) for c in NEW_OBJECT_BLOCK[0] for s in NEW_OBJECT_BLOCK[1]}
OBJECTS = sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in NEW_OBJECTS)  # seen in training
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
TAGS = ("attribute", "object", "relation")


@dataclass
class Scene:
    first: tuple[str, str]  # (colour, shape) on the left, or at the top
    second: tuple[str, str]
    axis: str  # "h": side by side; "v": one above the other


def pairings(block) -> set[frozenset]:
    (a, b), (x, y) = block
    return {frozenset({(a, x), (b, y)}), frozenset({(b, x), (a, y)})}


HELD_OUT_PAIRINGS = set().union(*(pairings(block) for block in VAL_BLOCKS + TEST_BLOCKS))


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


def random_scene(rng: np.random.Generator) -> Scene:
    """A training scene: two seen objects of different colour and shape, in a pairing not held out."""
    while True:
        a, b = (OBJECTS[i] for i in rng.choice(len(OBJECTS), 2, replace=False))
        if a[0] != b[0] and a[1] != b[1] and frozenset({a, b}) not in HELD_OUT_PAIRINGS:
            return Scene(a, b, str(rng.choice(["h", "v"])))


def train_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    templates = RELATIONAL[scene.axis] + CLAUSES[scene.axis]
    return [describe(scene, templates[rng.integers(len(templates))], ARTICLES[rng.integers(2)],
                     PREFIXES[rng.integers(len(PREFIXES))]) for _ in range(CAPTIONS_PER_IMAGE)]


def swap_example(tag: str, blocks, rng: np.random.Generator) -> tuple[Scene, Scene, str, str]:
    """Two scenes and two captions with the same words in a different order, from one of `blocks`."""
    colours, shapes = blocks[rng.integers(len(blocks))]
    c, s = rng.permutation(colours), rng.permutation(shapes)
    scene = Scene((c[0], s[0]), (c[1], s[1]), str(rng.choice(["h", "v"])))
    if tag == "attribute":  # "a red circle left of a blue square" / "a blue circle left of a red square"
        swapped = Scene((c[1], s[0]), (c[0], s[1]), scene.axis)
    else:  # the same two objects, their places exchanged
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
    new_objects_examples: int = 240  # test-new-objects
    text_clip_steps: int = 800  # SD's text encoder: the text tower of a CLIP pre-trained at batch 128
    text_clip_batch: int = 128
    clip_steps: int = 1600  # the CLIP that SDS-CLIP fine-tunes, pre-trained at batch 32 (order-blind; README)
    clip_batch: int = 32
    vae_steps: int = 400
    vae_batch: int = 32
    decoder_steps: int = 1500  # then the decoder alone, as SD's VAE decoder was fine-tuned (sd-vae-ft-mse)
    unet_steps: int = 8000
    unet_batch: int = 64


QUICK = Recipe(train_images=256, val_examples=12, test_examples=12, new_objects_examples=12, text_clip_steps=10,
               text_clip_batch=32, clip_steps=10, clip_batch=32, vae_steps=5, vae_batch=8, decoder_steps=5,
               unet_steps=10, unet_batch=16)
DATA_SIZES = ("train_images", "val_examples", "test_examples", "new_objects_examples")  # the fields that shape the data

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


# ----------------------------------------------------------------------------- phase 1: draw the data


def scene_record(scene: Scene) -> dict:
    return {"first": list(scene.first), "second": list(scene.second), "axis": scene.axis}


def write_train(root: Path, n: int, rng: np.random.Generator) -> None:
    """MS-COCO 2017 layout: train2017/<id>.png and annotations/captions_train2017.json."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations, scenes = [], [], {}
    for image_id in tqdm(range(1, n + 1), desc="draw train", unit="image"):
        scene = random_scene(rng)
        name = f"{image_id:012d}.png"
        draw(scene, rng).save(root / "train2017" / name)
        images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        scenes[name] = scene_record(scene)
        for caption in train_captions(scene, rng):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    data = {"info": {"description": "SDS-CLIP toy world"}, "images": images, "annotations": annotations}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(data))
    (root / "scenes.json").write_text(json.dumps(scenes))


def write_winoground(root: Path, n: int, blocks, rng: np.random.Generator) -> None:
    """Winoground layout: examples.jsonl and images/ex_<id>_img_<0|1>.png, tags cycling through TAGS."""
    (root / "images").mkdir(parents=True)
    scenes = {}
    with open(root / "examples.jsonl", "w") as f:
        for i in tqdm(range(n), desc=f"draw {root.name}", unit="example"):
            tag = TAGS[i % len(TAGS)]
            scene_0, scene_1, caption_0, caption_1 = swap_example(tag, blocks, rng)
            for k, scene in enumerate((scene_0, scene_1)):
                draw(scene, rng).save(root / "images" / f"ex_{i}_img_{k}.png")
                scenes[f"ex_{i}_img_{k}"] = scene_record(scene)
            f.write(json.dumps({"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1",
                                "caption_0": caption_0, "caption_1": caption_1, "tag": tag,
                                "secondary_tag": "", "num_main_preds": 2 if tag == "relation" else 1,
                                "collapsed_tag": tag}) + "\n")
    (root / "scenes.json").write_text(json.dumps(scenes))


def draw_data(root: Path, recipe: Recipe, seed: int) -> None:
    # One generator per split: the splits do not depend on each other's sizes.
    write_train(root / "train", recipe.train_images, np.random.default_rng([seed, 0]))
    write_winoground(root / "val", recipe.val_examples, VAL_BLOCKS, np.random.default_rng([seed, 1]))
    write_winoground(root / "test", recipe.test_examples, TEST_BLOCKS, np.random.default_rng([seed, 2]))
    write_winoground(root / "test-new-objects", recipe.new_objects_examples, (NEW_OBJECT_BLOCK,),
                     np.random.default_rng([seed, 3]))


# ----------------------------------------------------------------------------- phase 2: learn the tokenizer


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


# ----------------------------------------------------------------------------- phases 3–5: train the models


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


def as_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → uint8 (B, 3, H, W), as TrainSet holds them."""
    return torch.from_numpy(np.stack([np.array(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


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


# ----------------------------------------------------------------------------- phase 3: pre-train two CLIPs


def pretrain_clip(train: TrainSet, tokenizer: Tokenizer, steps: int, batch: int, seed: int) -> CLIP:
    """CLIP's contrastive pre-training (Radford et al. 2021) on the train split: one random caption
    per image, symmetric InfoNCE over the batch. Two are made, as SD 1.x's text encoder is the text
    tower of OpenAI's CLIP ViT-L/14 while SDS-CLIP fine-tunes another CLIP (ViT-B/32): SD's, at
    batch 128, and the CLIP to fine-tune, at batch 32, where a batch seldom holds an image's
    swapped partner, so that it stays order-blind as real CLIP is."""
    torch.manual_seed(seed)
    config = CLIPConfig(text=TextConfig(**{**vars(CLIP_CONFIG.text), "vocab_size": len(tokenizer.encoder),
                                           "eos_token_id": tokenizer.eot_id}),
                        vision=CLIP_CONFIG.vision, projection_dim=CLIP_CONFIG.projection_dim)
    model = CLIP(config).train()
    rng = np.random.default_rng([seed, 10])

    def loss_fn(step):
        pixels, captions = train.batch(rng, batch)
        return contrastive_loss(model(clip_pixels(pixels), tokenizer(captions)))  # logits_per_image (B, B)

    params = list(model.parameters())
    optimise(params, steps, 1e-3, loss_fn, f"pre-train CLIP (batch {batch})", weight_decay=0.05)
    return model.eval()


# ----------------------------------------------------------------------------- phase 4: train the VAE


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
    vae.config.scaling_factor = latent_scale(vae, train.pixels[:512], generator)
    return vae


def finetune_decoder(vae: VAE, train: TrainSet, recipe: Recipe, seed: int) -> VAE:
    """The decoder alone, trained longer to reconstruct colours faithfully (Stability AI's fix for
    SD's decoder, sd-vae-ft-mse): the encoder, and so the latents the UNet learns, stay as they are."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 21])
    generator = torch.Generator().manual_seed(seed + 2)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())

    def loss_fn(step):
        x = vae_pixels(train.batch(rng, recipe.vae_batch)[0])
        with torch.no_grad():
            z = vae.encode(x).sample(generator)
        return F.mse_loss(vae.decode(z), x)

    optimise(params, recipe.decoder_steps, 1e-3, loss_fn, "fine-tune the VAE's decoder")
    return vae.eval()


@torch.no_grad()
def latent_scale(vae: VAE, pixels: torch.Tensor, generator: torch.Generator) -> float:
    """1 / std of the latents of `pixels` (uint8): scaled latents have unit variance."""
    return float(1 / vae.encode(vae_pixels(pixels)).sample(generator).std())


# ----------------------------------------------------------------------------- phase 5: train the UNet


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
    with torch.no_grad():  # once: the posterior of every training image, and c of every distinct caption
        moments = [vae.encode(vae_pixels(p)) for p in train.pixels.split(256)]
        mean = torch.cat([m.mean for m in moments])
        std = torch.cat([m.std for m in moments])
        texts = sorted({c for cs in train.captions for c in cs} | {""})
        row = {text: i for i, text in enumerate(texts)}
        contexts = torch.cat([encode_prompt(text_encoder, tokenizer, texts[i:i + 512])  # (U, 77, 64)
                              for i in range(0, len(texts), 512)])

    def loss_fn(step):
        index = torch.from_numpy(rng.choice(len(train.captions), recipe.unet_batch, replace=False))
        captions = [train.captions[i][rng.integers(len(train.captions[i]))] if rng.random() >= CAPTION_DROP else ""
                    for i in index.tolist()]
        z0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator))
        z0 = z0 * vae.config.scaling_factor  # z_0: a latent sample × scaling_factor
        context = contexts[[row[c] for c in captions]]  # c: SD's conditioning, (B, 77, 64)
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


def write_sd(folder: Path, text_encoder: CLIP, vae: VAE, unet: UNet) -> None:
    """A diffusers StableDiffusionPipeline folder (write_tokenizer has written its tokenizer/)."""
    save_clip(text_encoder, folder / "text_encoder")
    save_vae(vae, folder / "vae")
    save_unet(unet, folder / "unet")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": BETA_START,
        "beta_end": BETA_END, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False},
        indent=2) + "\n")




# ----------------------------------------------------------------------------- phase 6: check the teacher

READER_DISTANCE = 60.0  # a pixel this close to a palette colour (RGB distance) is read as that colour
READER_MIN_PIXELS = 4  # a half with fewer such pixels holds no object
GUIDANCE = 4.0  # classifier-free guidance scale of the sampler (chosen on val)
SAMPLE_STEPS = 25  # DDIM steps
CHECK_TIMESTEPS = 100  # the diffusion score's timesteps in the checks


def read_colours(image: Image.Image, axis: str) -> tuple[str | None, str | None]:
    """A rule-based reader of the world's own pictures: the palette colour with the most pixels in
    each half (left and right for axis "h", top and bottom for "v"), None for a half without one."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    distance = np.linalg.norm(pixels[:, :, None] - np.array(list(COLOURS.values()), np.float32), axis=-1)
    nearest = np.where(distance.min(-1) < READER_DISTANCE, distance.argmin(-1), -1)  # (H, W): a colour or -1
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


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


@torch.no_grad()
def sample(unet: UNet, vae: VAE, text_encoder: CLIP, tokenizer: Tokenizer, captions: list[str],
           guidance: float = GUIDANCE, steps: int = SAMPLE_STEPS, seed: int = 0) -> torch.Tensor:
    """Images for `captions`, (B, 3, H, W) in [-1, 1]: DDIM (Song et al. 2021, η = 0) with
    classifier-free guidance (Ho & Salimans 2022), the empty prompt as the unconditional model."""
    a = NoiseSchedule().alphas_cumprod  # ᾱ_t
    context = encode_prompt(text_encoder, tokenizer, captions + [""])  # (B + 1, 77, D)
    context = torch.cat([context[:-1], context[-1:].expand(len(captions), -1, -1)])  # c rows, then the empty prompt
    size = unet.config.sample_size
    z = torch.randn((len(captions), unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    timesteps = torch.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps).round().long()
    for k, t in enumerate(timesteps):
        eps_c, eps_u = unet(torch.cat([z, z]), t.repeat(2 * len(z)), context).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)  # ε̂ = ε_u + s (ε_c − ε_u)
        x0 = (z - (1 - a[t]).sqrt() * eps) / a[t].sqrt()  # x̂_0 = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
        a_next = a[timesteps[k + 1]] if k + 1 < steps else torch.tensor(1.0)
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps  # z_t' = √ᾱ_t' x̂_0 + √(1−ᾱ_t') ε̂
    return vae.latents_to_images(z)


def read_split(root: Path) -> tuple[list[dict], dict, list[Image.Image]]:
    """A Winoground-layout split: its examples, scenes.json, and the images in the examples' order (0, 1, 0, 1, …)."""
    examples = [json.loads(line) for line in (root / "examples.jsonl").read_text().splitlines()]
    names = [e[f"image_{k}"] for e in examples for k in range(2)]
    images = [Image.open(root / "images" / f"{name}.png").convert("RGB") for name in names]
    return examples, json.loads((root / "scenes.json").read_text()), images


def group_by_tag(records: list[dict]) -> dict[str, float]:
    return {tag: 100 * float(np.mean([r["group"] for r in records if r["collapsed_tag"] == tag]))
            for tag in TAGS if any(r["collapsed_tag"] == tag for r in records)}


def check_teacher(paths: dict[str, Path], splits=("val", "test", "new_objects"), timesteps: int = CHECK_TIMESTEPS,
                  guidance: float = GUIDANCE, seed: int = 0) -> dict:
    """The small SD and CLIP checked on each split: the reader on the real images, the VAE's
    reconstructions (PSNR, reader), samples of every caption (reader), the diffusion score with
    `timesteps` shared-noise timesteps (group per tag, plain and normalised; 0: not computed), and
    CLIP's scores and image→caption R@1 among the split's distinct captions. Printed and returned."""
    from eval_winoground import StableDiffusion, Winoground, clip_scores, diffusion_errors, score_examples
    from eval_winoground import timestep_grid  # the scorers of eval_winoground.py, run in this process

    sd = StableDiffusion.from_pretrained(paths["sd"])
    clip, tokenizer = load_clip(paths["clip"]), Tokenizer.from_pretrained(paths["clip"])
    checks = {}
    for split in splits:
        examples, scenes, images = read_split(paths[split])
        truth = [scenes[e[f"image_{k}"]] for e in examples for k in range(2)]
        captions = [e[f"caption_{k}"] for e in examples for k in range(2)]
        real = as_pixels(images)
        with torch.no_grad():
            recon = torch.cat([sd.vae.decode(sd.vae.encode(vae_pixels(p)).mean) for p in real.split(256)])
        mse = ((recon.clamp(-1, 1) - vae_pixels(real)) / 2).pow(2).mean()  # on [0, 1]
        samples = torch.cat([sample(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, captions[i:i + 256], guidance,
                                    seed=seed + i) for i in range(0, len(captions), 256)])
        data = Winoground(paths[split])
        clip_records = score_examples(data.examples, clip_scores(clip, tokenizer, data, data.examples))
        drawn = [placed_right(im, s) for im, s in zip(to_pil(samples), truth)]  # image 2n + k: caption k of example n
        recall_scene, recall_objects = caption_recall(clip, tokenizer, images, captions, truth)
        checks[split] = {
            "reader on real images": 100 * float(np.mean([placed_right(im, s) for im, s in zip(images, truth)])),
            "VAE PSNR (dB)": float(-10 * torch.log10(mse)),
            "reader on VAE reconstructions": 100 * float(np.mean([placed_right(im, s)
                                                                  for im, s in zip(to_pil(recon), truth)])),
            "reader on samples": 100 * float(np.mean(drawn)),
            "reader on samples, per tag": {tag: 100 * float(np.mean([right for n, right in enumerate(drawn)
                                                                     if examples[n // 2]["collapsed_tag"] == tag]))
                                           for tag in TAGS},
            "CLIP group per tag": group_by_tag(clip_records),
            "CLIP image→caption R@1, scene": recall_scene,
            "CLIP image→caption R@1, objects": recall_objects,
        }
        if timesteps:  # the costly part: 3 prompts × 2 images × timesteps UNet calls per example
            errors = diffusion_errors(sd, data, data.examples, timestep_grid(timesteps), seed=seed, batch_size=600,
                                      unconditional=True)  # (N, 3, 2, T)
            plain = -errors[:, :2].mean(-1)  # s(c, i) = −E_t ‖ε_θ(z_t, t, c) − ε‖²
            normalised = -(errors[:, :2] - errors[:, 2:]).mean(-1)  # minus the empty prompt's error
            checks[split]["diffusion group per tag"] = group_by_tag(score_examples(data.examples, plain))
            checks[split]["diffusion group per tag, image score normalised"] = group_by_tag(
                score_examples(data.examples, plain, normalised))
        print(f"{split}: " + "; ".join(f"{k} {v:.1f}" if isinstance(v, float) else
                                        f"{k} " + " / ".join(f"{t} {x:.1f}" for t, x in v.items())
                                        for k, v in checks[split].items()), flush=True)
    return checks


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


def sheet(columns: list[list[tuple[Image.Image, str]]], file: Path) -> None:
    """A grid of pictures, each under its caption; one list of (image, caption) per column."""
    side, text_h, width = 4 * IMAGE_SIZE, 48, 4 * IMAGE_SIZE + 40
    rows = max(len(c) for c in columns)
    canvas = Image.new("RGB", (len(columns) * width, rows * (side + text_h)), "white")
    pen = ImageDraw.Draw(canvas)
    for n, column in enumerate(columns):
        x, y = n * width + 4, 0
        for image, caption in column:
            canvas.paste(image.resize((side, side), Image.NEAREST), (x, y + 4))
            lines, line = [], ""
            for word in caption.split():  # wrap the caption to the cell's width
                if line and pen.textlength(f"{line} {word}") > width - 8:
                    lines, line = lines + [line], word
                else:
                    line = f"{line} {word}".strip()
            pen.multiline_text((x, y + side + 6), "\n".join(lines + [line]), fill="black", spacing=2)
            y += side + text_h
    canvas.save(file)


def contact_sheet(root: Path, file: Path, count: int = 12) -> None:
    """The first test examples, one per column: image 0 over image 1, each under its caption."""
    examples, _, images = read_split(root)
    sheet([[(images[2 * n], f"[{e['tag']}] {e['caption_0']}"), (images[2 * n + 1], e["caption_1"])]
           for n, e in enumerate(examples[:count])], file)


def samples_sheet(paths: dict[str, Path], file: Path, count: int = 12, guidance: float = GUIDANCE) -> None:
    """The captions of the first test examples: the real image above the small SD's sample."""
    examples, _, images = read_split(paths["test"])
    sd = {"unet": load_unet(paths["sd"] / "unet"), "vae": load_vae(paths["sd"] / "vae"),
          "text_encoder": load_clip(paths["sd"] / "text_encoder"),
          "tokenizer": Tokenizer.from_pretrained(paths["sd"] / "tokenizer")}
    captions = [e["caption_0"] for e in examples[:count]]
    drawn = to_pil(sample(**sd, captions=captions, guidance=guidance))
    sheet([[(images[2 * n], f"real: {c}"), (drawn[n], "sampled")] for n, c in enumerate(captions)], file)


# ----------------------------------------------------------------------------- the recipe


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def is_toy_build(folder: Path) -> bool:
    """The folder holds a build.json that this script wrote."""
    try:
        return json.loads((folder / "build.json").read_text()).get("toy_world") is True
    except (OSError, ValueError, AttributeError):
        return False


def fresh_folder(folder: Path) -> None:
    """Empty `folder` for a build: only ever remove a folder this script built."""
    if folder.exists() and any(folder.iterdir()) and not is_toy_build(folder):
        raise SystemExit(f"{folder} exists and is not a toy-world build (no build.json written by "
                         f"weights/toyworld.py): nothing was removed; choose a new or empty folder with --out")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def train_models(data: Path, models: Path, recipe: Recipe, seed: int) -> dict:
    """Phases 2–5 on the drawn data: the tokenizer, the two CLIPs, the VAE and the UNet, written into
    `models` (clip/ and sd/); returns the seconds of each phase."""
    times = {}

    def phase(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        times[name] = round(time.perf_counter() - start, 1)
        return result

    for sub in ("clip", "sd"):
        shutil.rmtree(models / sub, ignore_errors=True)
    train = TrainSet.read(data / "train")
    tokenizer = phase("2. learn the tokenizer", write_tokenizer, [models / "clip", models / "sd" / "tokenizer"],
                      [c for cs in train.captions for c in cs])
    text_encoder = text_tower(phase("3a. pre-train SD's CLIP", pretrain_clip, train, tokenizer,
                                    recipe.text_clip_steps, recipe.text_clip_batch, seed))
    clip = phase("3b. pre-train the CLIP to fine-tune", pretrain_clip, train, tokenizer, recipe.clip_steps,
                 recipe.clip_batch, seed)
    save_clip(clip, models / "clip")
    vae = phase("4a. train the VAE", train_vae, train, recipe, seed)
    vae = phase("4b. fine-tune the VAE's decoder", finetune_decoder, vae, train, recipe, seed)
    unet = phase("5. train the UNet", train_unet, train, vae, text_encoder, tokenizer, recipe, seed)
    write_sd(models / "sd", text_encoder, vae, unet)
    return times


def model_files(models: Path) -> dict[str, str]:
    return {str(f.relative_to(models)): sha256(f) for sub in ("clip", "sd")
            for f in sorted((models / sub).rglob("*")) if f.is_file()}


def check_shipped(models: Path) -> None:
    """The shipped models are whole: every file that models.json lists, with its sha256."""
    try:
        listed = json.loads((models / "models.json").read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{models / 'models.json'} cannot be read ({err}): restore weights/toy-models with `git "
                         f"checkout weights/toy-models`, or train them with `python weights/toyworld.py --rebuild`")
    for name, digest in listed.items():
        if not (models / name).is_file() or sha256(models / name) != digest:
            raise SystemExit(f"{models / name} is missing or differs from the sha256 in {models / 'models.json'}: "
                             f"restore it with `git checkout weights/toy-models`, or train the models again with "
                             f"`python weights/toyworld.py --rebuild`")


def build(out: Path = TOY_DIR, seed: int = 0, quick: bool = False, rebuild: bool = False,
          models: Path = MODELS_DIR) -> dict[str, Path]:
    """The world's data, drawn into `out`/data (or reused when drawn with the same settings), and its
    models: the shipped ones in `models`, checked by sha256; with `rebuild`, trained from scratch
    into `models`; with `quick`, small ones trained into `out`/models. Returns the paths."""
    out = Path(out)
    recipe = QUICK if quick else Recipe()
    models = out / "models" if quick else Path(models)
    if not (quick or rebuild) and seed != 0:
        raise SystemExit("the shipped toy models were trained on the data of --seed 0; for another seed, "
                         "train them too with --rebuild (and --models DIR to keep the shipped ones)")
    if rebuild and models.is_dir() and any(models.iterdir()) and not (models / "models.json").is_file():
        raise SystemExit(f"{models} holds files but no models.json: it is not a toy-models folder, and nothing was "
                         f"removed; choose a new or empty folder with --models")
    data = out / "data"
    paths = {"train": data / "train", "val": data / "val", "test": data / "test",
             "new_objects": data / "test-new-objects", "clip": models / "clip", "sd": models / "sd"}
    settings = {"toy_world": True, "version": VERSION, "seed": seed, "quick": quick,
                "data": {k: getattr(recipe, k) for k in DATA_SIZES}}
    if not (is_toy_build(out) and {k: v for k, v in json.loads((out / "build.json").read_text()).items()
                                   if k in settings} == settings):
        fresh_folder(out)
        print(f"drawing the toy world's data in {data} (seed {seed}{', quick' if quick else ''}; cached afterwards)")
        start = time.perf_counter()
        draw_data(data, recipe, seed)
        contact_sheet(paths["test"], out / "contact_sheet.png")
        (out / "build.json").write_text(json.dumps({**settings, "seconds": round(time.perf_counter() - start, 1)},
                                                   indent=2) + "\n")
    record = models / "models.json"
    trained = {"version": VERSION, "seed": seed, "recipe": vars(recipe)}
    if rebuild or (quick and not (record.is_file() and json.loads(record.read_text()).get("settings") == trained)):
        models.mkdir(parents=True, exist_ok=True)
        print(f"training the toy models into {models} (seed {seed}{', quick' if quick else ''})")
        times = train_models(data, models, recipe, seed)
        record.write_text(json.dumps({"settings": trained, "torch": torch.__version__,
                                      "torch_threads": torch.get_num_threads(), "seconds": times,
                                      "sha256": model_files(models)}, indent=2) + "\n")
        print("trained: " + ", ".join(f"{name} {s:.0f} s" for name, s in times.items()))
    elif not quick:
        check_shipped(models)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(TOY_DIR), help="where the data is drawn (default: weights/toy)")
    parser.add_argument("--models", default=str(MODELS_DIR), help="the models' folder (default: weights/toy-models)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and every model's training")
    parser.add_argument("--rebuild", action="store_true", help="train every model from scratch into --models")
    parser.add_argument("--check", action="store_true", help="print the teacher's checks (after --rebuild: always)")
    parser.add_argument("--quick", action="store_true", help="a small functional build in a minute (tests)")
    args = parser.parse_args()
    paths = build(Path(args.out), args.seed, args.quick, args.rebuild, Path(args.models))
    if args.check or args.rebuild:
        checks = check_teacher(paths)
        if args.rebuild:  # the checks of the models as trained, beside their recipe
            record = Path(paths["clip"]).parent / "models.json"
            record.write_text(json.dumps({**json.loads(record.read_text()), "checks": checks}, indent=2) + "\n")
            samples_sheet(paths, Path(paths["clip"]).parent / "samples.png")

"""What fine-tuning did to the toy world's CLIP (issue 18; run by hand through
weights/toyworld/controls.py).

- The mechanism: linear probes on frozen image and text embeddings for a binding question (the
  colour of the left or top object) and a control question that needs no binding (which two
  colours), and a picture of h_w(f_φ(x)) decoded by the toy VAE: what the UNet "sees" of CLIP's
  image embedding.
- Retention: the base skill, image→caption R@1 and zero-shot recognition of the objects.

    python -m weights.toyworld.controls probe --clip out/toy-controls/negclip-seed0 --split val
    python -m weights.toyworld.controls retention --clip out/toy-controls/negclip-seed0
    python -m weights.toyworld.controls picture --runs out/toy-evidence/control-seed0 out/toy-evidence/full-seed0 --out hw.png
"""

import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from clip import Tokenizer
from sds import Mapper
from weights import coco
from weights.networks import load_clip, load_tokenizer, load_vae

from .teacher import caption_recall
from .world import COLOURS, SHAPES, as_pixels, clip_pixels, read_split, sheet, to_pil

# all of them, the never-trained ones too
OBJECTS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
COLOUR_PAIRS = [frozenset(pair) for pair in itertools.combinations(COLOURS, 2)]


# ----------------------------------------------------------------------------- linear probes


def probe(embeds_train, labels_train, embeds_test, labels_test, l2: float = 1e-3,
          max_iter: int = 500) -> float:
    """A linear probe: multinomial logistic regression on standardised features, fitted by L-BFGS to
    convergence on (embeds_train (N, D), labels_train (N,)); returns the accuracy (%) on the test
    set.

        min_{W,b} 1/N Σ_n −log softmax(W x̂_n + b)_{y_n} + l2 ‖W‖²,   x̂ = (x − μ_train) / σ_train"""
    x, x_test = torch.as_tensor(embeds_train).double(), torch.as_tensor(embeds_test).double()
    y, y_test = torch.as_tensor(labels_train).long(), torch.as_tensor(labels_test).long()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x, x_test = (x - mean) / std, (x_test - mean) / std  # x̂, with the train split's statistics
    linear = nn.Linear(x.shape[1], int(max(y.max(), y_test.max())) + 1).double()
    # a convex problem: start at the origin, the same answer every time
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20,
                                  line_search_fn="strong_wolfe")

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
    """The first `count` images of the train split (by id): uint8 pixels (N, 3, H, W), captions,
    scenes."""
    data = json.loads((root / coco.CAPTIONS_FILE).read_text())
    scenes = json.loads((root / "scenes.json").read_text())  # keyed by file name
    captions = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"])
    images = sorted(data["images"], key=lambda im: im["id"])[:count]
    pixels = as_pixels([Image.open(root / coco.IMAGES_DIR / im["file_name"]) for im in images])
    return pixels, [captions[im["id"]] for im in images], [scenes[im["file_name"]] for im in images]


def read_examples(root: Path) -> tuple[list[Image.Image], list[list[str]], list[dict]]:
    """A Winoground-layout split's images (0, 1, 0, 1, …), each one's caption (a list of one) and
    scene."""
    examples, scenes, images = read_split(root)
    return (images, [[e[f"caption_{k}"]] for e in examples for k in range(2)],
            [scenes[e[f"image_{k}"]] for e in examples for k in range(2)])


@torch.no_grad()
def image_embeddings(clip, pixels: torch.Tensor) -> torch.Tensor:
    """f_φ(x) / ‖f_φ(x)‖ of uint8 pixels (N, 3, 32, 32): what CLIP's score compares."""
    return torch.cat([F.normalize(clip.encode_image(clip_pixels(p)), dim=-1)
                      for p in pixels.split(512)])


@torch.no_grad()
def text_embeddings(clip, tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.cat([F.normalize(clip.encode_text(tokenizer(texts[i: i + 512])), dim=-1)
                      for i in range(0, len(texts), 512)])


def majority(labels: list) -> float:
    """The accuracy (%) of always guessing the most frequent label."""
    return 100 * Counter(labels).most_common(1)[0][1] / len(labels)


def binding_probe(clip_dir, paths: dict, split: str = "test",
                  train_images: int = 2000) -> dict[str, float]:
    """Linear probes on the frozen embeddings of the CLIP in clip_dir, each question asked of the
    images and of the captions: trained on the first `train_images` train-split images (and all
    their captions), tested on the images and captions of `split` (a caption's label: the scene of
    its image). Accuracies (%), beside "chance" (always the most frequent test label) and, for the
    binding question, the best that the two colours alone allow (the most frequent first colour of
    each colour pair in the test set): an embedding that knows which colours but not where scores
    that, not more."""
    clip, tokenizer = load_clip(clip_dir).eval(), load_tokenizer(clip_dir)
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
            results[f"{question}, {tower}"] = probe(embeds[tower][0], train_labels,
                                                    embeds[tower][1], test_labels)
        results[f"{question}, chance"] = majority([label(s) for s in test_scenes])
    by_pair = defaultdict(list)
    for scene in test_scenes:
        by_pair[colour_pair(scene)].append(first_colour(scene))
    results["first colour, from the colours alone"] = 100 * sum(
        Counter(firsts).most_common(1)[0][1] for firsts in by_pair.values()) / len(test_scenes)
    print(f"probes on {len(train_scenes):,} train images and their {len(scenes['text'][0]):,} "
          f"captions, tested on {len(test_scenes)} {split} images and captions")
    return results


# ----------------------------------------------------------------------------- retention


def zero_shot(similarity: torch.Tensor, scenes: list[dict]) -> tuple[float, float]:
    """similarity (N, len(OBJECTS)) of each image with each object's prompt → (the share (%) of
    images whose two best prompts are exactly its two objects, the share whose best prompt is one of
    them)."""
    best = similarity.topk(2, dim=-1).indices.tolist()
    truth = [{tuple(s["first"]), tuple(s["second"])} for s in scenes]
    pair = [{OBJECTS[a], OBJECTS[b]} == objects for (a, b), objects in zip(best, truth)]
    top1 = [OBJECTS[a] in objects for (a, _), objects in zip(best, truth)]
    return 100 * float(np.mean(pair)), 100 * float(np.mean(top1))


@torch.no_grad()
def retention(clip_dir, paths: dict, split: str = "test") -> dict[str, float]:
    """The base skill of the CLIP in clip_dir on `split` (%): image→caption R@1 among the split's
    distinct captions (toyworld.caption_recall: the nearest caption describes the image's scene; or
    names its two objects, in any arrangement), and zero-shot object recognition with the prompts "a
    <colour> <shape>" of every object (OBJECTS): the top two prompts exactly the image's two
    objects, or the top one of them."""
    clip, tokenizer = load_clip(clip_dir).eval(), load_tokenizer(clip_dir)
    images, captions, scenes = read_examples(Path(paths[split]))
    # (objects, D)
    prompts = text_embeddings(clip, tokenizer, [f"a {colour} {shape}" for colour, shape in OBJECTS])
    # cos(f_φ(x), g_φ(prompt))
    pair, top1 = zero_shot(image_embeddings(clip, as_pixels(images)) @ prompts.T, scenes)
    scene_found, objects_found = caption_recall(clip, tokenizer, images, [c for [c] in captions],
                                                scenes)
    return {"image→caption R@1": scene_found, "image→caption R@1, the two objects": objects_found,
            "zero-shot objects, top 2 exact": pair, "zero-shot objects, top 1 present": top1}


# ----------------------------------------------------------------------------- what the UNet sees


def load_mapper(folder: Path, embed_dim: int) -> Mapper:
    """h_w from a train.py output folder's mapper.safetensors (its latent shape in the metadata)."""
    file = Path(folder) / "mapper.safetensors"
    if not file.is_file():
        raise SystemExit(f"weights.toyworld.controls: {file} not found: the picture needs a "
                         f"train.py output folder (train.py writes h_w there)")
    with safe_open(file, "pt") as f:
        latent_shape = json.loads(f.metadata()["latent_shape"])
    mapper = Mapper(embed_dim, latent_shape)
    mapper.load_state_dict(load_file(file), strict=True)
    return mapper.eval()


@torch.no_grad()
def hw_picture(model_dirs: dict[str, Path], paths: dict, file, count: int = 6,
               split: str = "test") -> dict:
    """A PNG grid: image 0 of the first `count` examples of `split`, then per model (name → a
    train.py output folder) h_w(f_φ(x)) decoded by the toy VAE. h_w makes SD's z_0, the latent ×
    scaling_factor, so the picture is D(h_w(f_φ(x)) / scaling_factor). Returns the decoded images,
    name → (count, 3, H, W)."""
    examples, _, images = read_split(Path(paths[split]))
    real = images[0::2][:count]
    pixels = as_pixels(real)
    vae = load_vae(Path(paths["sd"]) / "vae").eval()
    columns, decoded = [[(im, f"real: {e['caption_0']}") for im, e in zip(real, examples)]], {}
    for name, folder in model_dirs.items():
        clip = load_clip(folder).eval()
        mapper = load_mapper(folder, clip.config.projection_dim)
        if mapper.latent_shape[0] != vae.config.latent_channels:
            raise SystemExit(f"weights.toyworld.controls: {folder}'s h_w makes latents "
                             f"{mapper.latent_shape}, the VAE in {paths['sd']} takes "
                             f"{vae.config.latent_channels} channels: another world's run?")
        z0 = mapper(clip.encode_image(clip_pixels(pixels)))  # z_0 = h_w(f_φ(x)), (count, 4, h, w)
        decoded[name] = vae.latents_to_images(z0)  # D(z_0 / scaling_factor), (count, 3, H, W)
        columns.append([(im, name) for im in to_pil(decoded[name])])
    sheet(columns, Path(file))
    return decoded

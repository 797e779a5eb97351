"""The toy world itself: its objects, its scenes and their captions, the splits, and how they are
drawn and read.

Pictures of two coloured shapes side by side or one above the other ("a red circle to the
left of a blue square"), captioned by a small grammar. Like Winoground, the main splits ask
about familiar things in new arrangements. Every object (a colour–shape pair) of val and test
is seen in training; what is new is the pairing: which two objects appear together. The
pairings of val and test never occur in training, so neither image of an example has been
seen. Each example holds two images and two captions with the same words in a different order:
the colours swapped between the two objects ("attribute", binding), the objects swapped around
the relation ("object"), or the relation words swapped between the objects ("relation"). The
second split, test-new-objects, asks the same about four objects that never occur in training.

Writes the MS-COCO 2017 layout (train) and the Winoground layout (val, test, test-new-objects),
each with scenes.json, the ground truth of every image; reads them back as pixels.
"""

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from clip import OPENAI_MEAN, OPENAI_STD
from weights.networks import write_atomically

# ----------------------------------------------------------------------------- the world

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 220),
           "yellow": (235, 195, 25), "purple": (135, 55, 175), "cyan": (30, 190, 200),
           "pink": (240, 110, 200), "brown": (140, 90, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
# A block, 2 colours × 2 shapes, holds two pairings of objects: {red circle, blue square} and
# {blue circle, red square}. Every swap (colours, places, relation words) maps a scene of a block
# into the same block, so a split drawn from blocks never needs a pairing outside them.
# test-new-objects: these 4 objects never in training
NEW_OBJECT_BLOCK = (("red", "blue"), ("circle", "square"))
VAL_BLOCKS = ((("yellow", "purple"), ("circle", "cross")),
              (("green", "cyan"), ("square", "triangle")), (("red", "pink"), ("triangle", "cross")),
              (("blue", "brown"), ("triangle", "cross")),
              (("cyan", "brown"), ("circle", "square")), (("green", "pink"), ("circle", "cross")))
TEST_BLOCKS = ((("green", "yellow"), ("circle", "triangle")),
               (("purple", "cyan"), ("square", "cross")), (("red", "brown"), ("triangle", "cross")),
               (("blue", "yellow"), ("triangle", "cross")),
               (("pink", "cyan"), ("circle", "square")),
               (("purple", "brown"), ("circle", "triangle")))
NEW_OBJECTS = {(c, s) for c in NEW_OBJECT_BLOCK[0] for s in NEW_OBJECT_BLOCK[1]}
# seen in training
OBJECTS = sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in NEW_OBJECTS)
IMAGE_SIZE = 32  # pixels; CLIP sees 8 × 8 patches of 4 pixels, the VAE makes 8 × 8 latents
SUPERSAMPLE = 8  # draw at 8× and downsample: anti-aliased edges

# Captions. A is the object on the left (or at the top), B the other; "{A}" is "a red circle".
RELATIONAL = {  # one relation between two noun phrases
    "h": ("{A} to the left of {B}", "{B} to the right of {A}", "{A} left of {B}",
          "{B} right of {A}"),
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
    """A training scene: two seen objects of different colour and shape, in a pairing not held
    out."""
    while True:
        a, b = (OBJECTS[i] for i in rng.choice(len(OBJECTS), 2, replace=False))
        if a[0] != b[0] and a[1] != b[1] and frozenset({a, b}) not in HELD_OUT_PAIRINGS:
            return Scene(a, b, str(rng.choice(["h", "v"])))


def train_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    templates = RELATIONAL[scene.axis] + CLAUSES[scene.axis]
    return [describe(scene, templates[rng.integers(len(templates))], ARTICLES[rng.integers(2)],
                     PREFIXES[rng.integers(len(PREFIXES))]) for _ in range(CAPTIONS_PER_IMAGE)]


def swap_example(tag: str, blocks, rng: np.random.Generator) -> tuple[Scene, Scene, str, str]:
    """Two scenes and two captions with the same words in a different order, from one of
    `blocks`."""
    colours, shapes = blocks[rng.integers(len(blocks))]
    c, s = rng.permutation(colours), rng.permutation(shapes)
    scene = Scene((c[0], s[0]), (c[1], s[1]), str(rng.choice(["h", "v"])))
    # "a red circle left of a blue square" / "a blue circle left of a red square"
    if tag == "attribute":
        swapped = Scene((c[1], s[0]), (c[0], s[1]), scene.axis)
    else:  # the same two objects, their places exchanged
        swapped = Scene(scene.second, scene.first, scene.axis)
    # "a red circle on the left and a blue square on the right" / "… on the right … left"
    if tag == "relation":
        place = {"h": ("on the left", "on the right"),
                 "v": ("at the top", "at the bottom")}[scene.axis]
        caption_0 = f"{noun(scene.first)} {place[0]} and {noun(scene.second)} {place[1]}"
        caption_1 = f"{noun(scene.first)} {place[1]} and {noun(scene.second)} {place[0]}"
    else:  # attribute, object: one relational template, filled from each scene
        template = RELATIONAL[scene.axis][rng.integers(len(RELATIONAL[scene.axis]))]
        caption_0, caption_1 = describe(scene, template), describe(swapped, template)
    return scene, swapped, caption_0, caption_1



# ----------------------------------------------------------------------------- the data's files


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
        images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE,
                       "height": IMAGE_SIZE})
        scenes[name] = scene_record(scene)
        for caption in train_captions(scene, rng):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "caption": caption})
    data = {"info": {"description": "SDS-CLIP toy world"}, "images": images,
            "annotations": annotations}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(data))
    (root / "scenes.json").write_text(json.dumps(scenes))


def write_winoground(root: Path, n: int, blocks, rng: np.random.Generator) -> None:
    """Winoground layout: examples.jsonl and images/ex_<id>_img_<0|1>.png, tags cycling through
    TAGS."""
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
                                "secondary_tag": "", "num_main_preds": 2 if tag == "relation"
                                else 1, "collapsed_tag": tag}) + "\n")
    (root / "scenes.json").write_text(json.dumps(scenes))


def image_bytes(image: Image.Image, image_format: str = "PNG") -> bytes:
    """The image as a file's bytes, for weights.networks.write_atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- read a split; pixels


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
        return self.pixels[index], [self.captions[i][rng.integers(len(self.captions[i]))]
                                    for i in index]


def as_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → uint8 (B, 3, H, W), as TrainSet holds them."""
    return torch.from_numpy(np.stack([np.array(im.convert("RGB")) for im in images])).permute(0, 3,
                                                                                              1, 2)


def clip_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, 32, 32) → CLIP's input, exactly clip.image_transform(32) of the PNG (no resize
    needed)."""
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def vae_pixels(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1  # [0, 255] → [-1, 1], the VAE's range


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def read_split(root: Path) -> tuple[list[dict], dict, list[Image.Image]]:
    """A Winoground-layout split: its examples, scenes.json, and the images in the examples' order
    (0, 1, 0, 1, …)."""
    try:
        examples = [json.loads(line)
                    for line in (root / "examples.jsonl").read_text().splitlines()]
        names = [e[f"image_{k}"] for e in examples for k in range(2)]
        images = [Image.open(root / "images" / f"{name}.png").convert("RGB") for name in names]
        return examples, json.loads((root / "scenes.json").read_text()), images
    except (OSError, ValueError, KeyError) as err:  # drawn, not downloaded: drawn again
        raise SystemExit(f"{root}: the toy world's drawn data cannot be read ({err}): delete "
                         f"{root.parent.parent} and rerun") from None


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
            pen.multiline_text((x, y + side + 6), "\n".join(lines + [line]), fill="black",
                               spacing=2)
            y += side + text_h
    image_format = Image.registered_extensions().get(Path(file).suffix.lower(), "PNG")
    write_atomically(file, image_bytes(canvas, image_format))


def contact_sheet(root: Path, file: Path, count: int = 12) -> None:
    """The first test examples, one per column: image 0 over image 1, each under its caption."""
    examples, _, images = read_split(root)
    sheet([[(images[2 * n], f"[{e['tag']}] {e['caption_0']}"), (images[2 * n + 1], e["caption_1"])]
           for n, e in enumerate(examples[:count])], file)

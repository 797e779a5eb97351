"""MS-COCO 2017 captions on disk: the images of train2017/ with their captions, for train.py."""

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from weights.images import open_image
from weights.winoground import fetch_again, leaves_folder


CAPTIONS_FILE = "annotations/captions_train2017.json"
IMAGES_DIR = "train2017"


class CocoCaptions(Dataset):
    """MS-COCO 2017 train: item i is image i (images sorted by id) as CLIP pixels; its captions
    are kept here, and `caption(i, epoch)` draws one of them per image and epoch. Entries of the
    captions file that cannot be used (a caption that is not text, an image without captions or
    with a non-integer id, a repeated image) are left out and counted: summary() reports them."""

    def __init__(self, root: str | Path, transform, limit_images: int = 0, seed: int = 0,
                 image_size: int | None = None):
        root, self.transform, self.seed, self.image_size = Path(root), transform, seed, image_size
        self.file = file = root / CAPTIONS_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found — pass --coco_root the folder that holds "
                                    f"annotations/ and {IMAGES_DIR}/, or " + fetch_again(
                                        root, f"run `python weights/download.py --coco {root}`"))
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            images, captions, self.skipped = self._index(data)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{file} is not a COCO captions file ({type(err).__name__}: {err}) — "
                             + fetch_again(root, f"run `python weights/download.py --coco {root}` "
                                                 f"again")) from None
        images = images[:limit_images] if limit_images else images
        if not images:
            raise ValueError(f"{file} lists no captioned images")
        self.files = [root / IMAGES_DIR / name for _, name in images]
        self.captions = [captions[image_id] for image_id, _ in images]

    @staticmethod
    def _index(data: dict) -> tuple[list[tuple[int, str]], dict[int, list], dict[str, list]]:
        """The usable images as (id, file name) sorted by id, the captions of each id, and what was
        left out: {reason: [the entries, shortly]}."""
        skipped, captions = defaultdict(list), defaultdict(list)
        for ann in data["annotations"]:
            if isinstance(ann["caption"], str):
                captions[ann["image_id"]].append(ann["caption"].strip())
            else:
                skipped["annotations whose caption is not text"].append(
                    f"id {ann.get('id')}: {ann['caption']!r}")
        images, seen = [], set()
        for image in data["images"]:
            image_id, name = image["id"], image["file_name"]
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                skipped["images whose id is not an integer"].append(repr(image_id))
                continue
            if image_id in seen:
                skipped["repeated image entries (the first is kept)"].append(str(image_id))
                continue
            seen.add(image_id)
            if not isinstance(name, str):
                skipped["images whose file_name is not text"].append(f"id {image_id}: {name!r}")
            elif leaves_folder(name):  # never read from outside train2017/
                skipped["images whose file_name is absolute or goes up with '..'"].append(
                    f"id {image_id}: {name!r}")
            elif image_id not in captions:
                skipped["images without captions"].append(str(image_id))
            else:
                images.append((image_id, name))
        for key in [key for key in captions if key not in seen]:  # an image_id written as text, say
            skipped["captions of no listed image"] += [f"image_id {key!r}"] * len(captions[key])
        return sorted(images), captions, dict(skipped)

    def summary(self) -> str:
        """What was read from the captions file; a line per kind of entry left out, and examples."""
        n_captions = sum(map(len, self.captions))
        lines = [f"{self.file}: {len(self):,} images with {n_captions:,} captions"]
        for reason, entries in self.skipped.items():
            shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
            lines.append(f"  left out {len(entries):,} {reason} ({shown})")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        """(pixels, index, None), or (None, index, why) for a missing, unreadable or huge image."""
        file = self.files[index]
        try:
            return self.transform(open_image(file, size=self.image_size)), index, None
        except FileNotFoundError:
            return None, index, f"{file} not found"
        except ValueError as err:  # open_image's one sentence, naming the file
            return None, index, str(err)

    def caption(self, index: int, epoch: int) -> str:
        """One of image `index`'s captions, drawn afresh each epoch from (seed, epoch, index)."""
        captions = self.captions[index]
        return captions[np.random.default_rng((self.seed, epoch, index)).integers(len(captions))]


def collate(samples):
    good = [s for s in samples if s[0] is not None]
    pixels = torch.stack([s[0] for s in good]) if good else None  # (B, 3, S, S)
    return pixels, [s[1] for s in good], [s[2] for s in samples if s[0] is None]


def batches(dataset, sampler, local_batch: int, batches_per_epoch: int, start: int,
            num_workers: int):
    """Yield (epoch, batch) forever, beginning with global batch number `start`.

    The order of an epoch is DistributedSampler's permutation of (seed, epoch); process r of W
    takes positions r, r+W, … of it, so that the W local batches of one step hold the same
    images as one process's batch. Resuming only needs the batch number."""
    epoch, skip = divmod(start, batches_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * local_batch: batches_per_epoch * local_batch]
        for batch in DataLoader(dataset, local_batch, sampler=order, collate_fn=collate,
                                num_workers=num_workers):
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def check_images(pixels, errors: list[str], skip_bad_images: bool, device) -> list[str]:
    """A batch's missing or unreadable images: stop at them on every process, unless
    --skip_bad_images (or no image of the batch is readable); returns them, to count."""
    stop = (bool(errors) and not skip_bad_images) or pixels is None
    if dist.is_initialized():  # stop if any process stops
        flag = torch.tensor([float(stop)], device=device)
        dist.all_reduce(flag)
        stop = flag.item() > 0
    if stop:
        for error in errors:
            print(f"train.py: {error}", file=sys.stderr)
        if pixels is None and not errors:
            print("train.py: a batch has no readable image", file=sys.stderr)
        raise SystemExit("train.py: stopped at a missing or unreadable image"
                         + ("" if skip_bad_images else " (--skip_bad_images skips them)"))
    return errors


def image_chunks(dataset: CocoCaptions, index, size: int, verbose: bool):
    """The images of `index`, 32 at a time, decoded at `size` pixels a side or more (train.py's
    --mapper fitted reads them before training); one line for the first that cannot be read."""
    for chunk in tqdm(np.array_split(index, math.ceil(len(index) / 32)), desc="fitting h_w",
                      disable=not verbose):
        try:
            yield [open_image(dataset.files[i], size=max(size, dataset.image_size or 0)) for i in chunk]
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"train.py: --mapper fitted reads its images first: {err}") from None

"""SugarCrepe on disk (Hsieh et al. 2023, https://arxiv.org/abs/2306.14610): the seven annotation
files of github.com/RAIVNLab/sugar-crepe's data/ folder and the MS-COCO val2017 images they name.

Each file maps an id to {"filename", "caption", "negative_caption"}: one image, its true caption
and a hard negative made by replacing, swapping or adding an object, attribute or relation. An
item is right when the image scores its caption above the negative. `Item` and `ItemImages` are
shared with ARO's reader (weights/aro.py), whose items have the same shape plus a box to crop to.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from weights.images import open_image
from weights.winoground import leaves_folder

# The official files, in the paper's order of categories within each kind of change.
FILES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
KEYS = ("filename", "caption", "negative_caption")
SOURCE = "the data/ folder of github.com/RAIVNLab/sugar-crepe"


@dataclass
class Item:
    """One image and two captions; right when the image scores `caption` above `negative`."""
    id: int  # the position in the run, unique across the benchmark's files (--compare pairs by it)
    file: str  # the annotation file's stem: "swap_obj", "visual_genome_relation"
    key: str  # the item's own id in that file (SugarCrepe's "0", …; ARO's list index)
    subset: str  # what accuracies are averaged over: SugarCrepe's file, ARO's relation or pair
    image: str  # the file name inside the images folder
    caption: str
    negative: str
    box: tuple[int, int, int, int] | None = None  # ARO: x, y, w, h of the region to crop to


class ItemImages(torch.utils.data.Dataset):
    """Item n → its image, preprocessed, (1, 3, S, S): the one-image counterpart of Winoground's
    ImagePairs, decoded in DataLoader workers while the model works."""

    def __init__(self, data, items: list[Item], transform, size: int):
        self.data, self.items, self.transform, self.size = data, items, transform, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, n: int) -> torch.Tensor:
        return self.transform(self.data.image(self.items[n], self.size)).unsqueeze(0)


def missing_images(names: list[str], folder: Path, source: Path, hint: str) -> None:
    """A FileNotFoundError naming the images of `source` that `folder` lacks, checked up front so
    that a broken copy fails before any model loads."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found; {hint}")
    missing = [name for name in sorted(set(names)) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) named in {source} not found in {folder}: "
                                f"{', '.join(missing[:10])}; {hint}")


def read_json(file: Path):
    """The parsed content of `file`, or one ValueError naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); download it again") from None


def read_annotations(file: Path, first_id: int = 0) -> list[Item]:
    """The items of one annotation file, numbered from `first_id`, or a ValueError naming the
    file and the item that breaks its layout."""
    content = read_json(file)
    if not isinstance(content, dict) or not content:
        raise ValueError(f"{file} should map ids to items, as SugarCrepe's files do; download it "
                         f"again from {SOURCE}")
    items = []
    for key, value in content.items():
        where = f"{file} item {key!r}"
        if not isinstance(value, dict) or any(k not in value for k in KEYS):
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{where} has {have}, not the keys {list(KEYS)}; download the file "
                             f"again from {SOURCE}")
        if not isinstance(value["negative_caption"], str) or not value["negative_caption"]:
            raise ValueError(f"{where} has no negative caption, so it cannot be scored; download "
                             f"the file again from {SOURCE}")
        name = value["filename"]
        if not isinstance(name, str) or not isinstance(value["caption"], str) or (
                leaves_folder(name)):
            raise ValueError(f"{where}: filename {name!r} and caption should be strings, the "
                             f"name a file inside the images folder; download the file again")
        items.append(Item(first_id + len(items), file.stem, key, file.stem, name,
                          value["caption"], value["negative_caption"]))
    return items


class SugarCrepe:
    """SugarCrepe's items from the annotation files in `path` (any of the seven; at least one) and
    their images from `images` (COCO val2017), every image checked to exist up front."""

    def __init__(self, path: str | Path, images: str | Path, option: str = "--sugarcrepe"):
        self.root, self.images = Path(path), Path(images)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SugarCrepe not found at {self.root}: download {SOURCE} "
                                    f"(weights/README.md says how), or pass {option}")
        self.files = [f for f in FILES if (self.root / f"{f}.json").is_file()]
        if not self.files:
            raise ValueError(f"{self.root} holds none of SugarCrepe's annotation files "
                             f"({', '.join(f + '.json' for f in FILES)}); point {option} to "
                             f"{SOURCE}")
        self.items = []
        for stem in self.files:
            self.items += read_annotations(self.root / f"{stem}.json", len(self.items))
        missing_images([item.image for item in self.items], self.images, self.root,
                       "--images takes the folder of MS-COCO's val2017 images")

    def image(self, item: Item, size: int | None = None) -> Image.Image:
        """The decoded image; with `size` (the side the preprocessing resizes to) a large one is
        decoded reduced."""
        try:
            return open_image(self.images / item.image, size=size)
        except ValueError as err:  # unreadable, or too large to decode safely
            raise ValueError(f"{err}; download COCO's val2017 images again") from None

"""ARO's VG-Relation and VG-Attribution on disk (Yuksekgonul et al. 2023,
https://arxiv.org/abs/2210.01936), in the layout of the authors' loader
(github.com/mertyg/vision-language-models-are-bows, dataset_zoo/aro_datasets.py).

visual_genome_relation.json and visual_genome_attribution.json each list items {"image_path",
"bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption"} plus "relation_name"
(relation) or "attributes": [a1, a2] (attribution); the Visual Genome images are in images/
beside them. Each image is cropped to its box before preprocessing, as the authors do, so that
the caption's two objects fill the frame.
"""

from pathlib import Path

from PIL import Image

from clip import to_rgb
from weights.images import open_image
from weights.sugarcrepe import Item, missing_images, read_json
from weights.winoground import leaves_folder

FILES = ("visual_genome_relation", "visual_genome_attribution")
KEYS = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption")
GROUP_KEY = {"visual_genome_relation": "relation_name", "visual_genome_attribution": "attributes"}
# The authors' loader reports every relation, but only the attribute pairs with at least 25 items.
MIN_GROUP_ITEMS = {"visual_genome_relation": 1, "visual_genome_attribution": 25}
SOURCE = "the download links of github.com/mertyg/vision-language-models-are-bows"


def _subset(value, file: Path, where: str) -> str:
    """The relation's name, or the attribute pair joined as the authors join it ("white_black")."""
    if file.stem == "visual_genome_relation" and isinstance(value, str):
        return value
    if (file.stem == "visual_genome_attribution" and isinstance(value, list) and len(value) == 2
            and all(isinstance(a, str) for a in value)):
        return f"{value[0]}_{value[1]}"
    raise ValueError(f"{where}: {GROUP_KEY[file.stem]} is {value!r}, not "
                     f"{'a relation name' if 'relation' in file.stem else 'two attributes'}; "
                     f"download the file again from {SOURCE}")


def read_items(file: Path, first_id: int = 0) -> list[Item]:
    """The items of one ARO file, numbered from `first_id`, or a ValueError naming the file and
    the item that breaks its layout."""
    content = read_json(file)
    if not isinstance(content, list) or not content:
        raise ValueError(f"{file} should be a list of items, as ARO's files are; download it again "
                         f"from {SOURCE}")
    keys, items = (*KEYS, GROUP_KEY[file.stem]), []
    for index, value in enumerate(content):
        where = f"{file} item {index}"
        if not isinstance(value, dict) or any(k not in value for k in keys):
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{where} has {have}, not the keys {list(keys)}; download the file "
                             f"again from {SOURCE}")
        box = tuple(value[k] for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box) or (
                min(box[2:]) <= 0):
            raise ValueError(f"{where}: box {box} should be numbers with a positive width and "
                             f"height; download the file again from {SOURCE}")
        texts = [value[k] for k in ("image_path", "true_caption", "false_caption")]
        if not all(isinstance(t, str) and t for t in texts) or leaves_folder(texts[0]):
            raise ValueError(f"{where}: image_path, true_caption and false_caption should be "
                             f"non-empty strings, the path a file inside images/; download the "
                             f"file again from {SOURCE}")
        items.append(Item(first_id + index, file.stem, str(index),
                          _subset(value[GROUP_KEY[file.stem]], file, where), texts[0], texts[1],
                          texts[2], box))
    return items


class ARO:
    """VG-Relation's and VG-Attribution's items from `path` (either file, or both) and their
    images from `path`/images, every image checked to exist up front."""

    def __init__(self, path: str | Path, option: str = "--aro"):
        self.root = Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ARO not found at {self.root}: download its files from "
                                    f"{SOURCE} (weights/README.md says where they go), or pass "
                                    f"{option}")
        self.files = [f for f in FILES if (self.root / f"{f}.json").is_file()]
        if not self.files:
            raise ValueError(f"{self.root} holds neither {FILES[0]}.json nor {FILES[1]}.json; "
                             f"point {option} to the folder of ARO's files")
        self.items = []
        for stem in self.files:
            self.items += read_items(self.root / f"{stem}.json", len(self.items))
        missing_images([item.image for item in self.items], self.root / "images", self.root,
                       f"download ARO's images from {SOURCE} into images/")

    def image(self, item: Item, size: int | None = None) -> Image.Image:
        """The image cropped to the item's box. Decoded at full size: Visual Genome's images are
        small (up to about 1,280 pixels a side), and a reduced decode would move the box."""
        path = self.root / "images" / item.image
        try:
            image = to_rgb(open_image(path))
        except ValueError as err:  # unreadable, or too large to decode safely
            raise ValueError(f"{err}; download ARO's images again") from None
        x, y, w, h = item.box
        return image.crop((x, y, x + w, y + h))  # beyond the image: black, as the authors' crop

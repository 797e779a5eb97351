"""weights.coco.CocoCaptions on bad input: a captions file with entries that cannot be used, and images
that cannot be decoded. Every entry left out is counted in summary(); no image crashes a worker."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clip
from clip import image_transform
from weights import images
from weights.coco import CocoCaptions, collate

IMAGE_SIZE = 32


def write_coco(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    """annotations/captions_train2017.json as given, and a 40 × 30 JPEG for every image entry with a text name."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for image in images:
        if isinstance(image["file_name"], str):
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train2017" / image["file_name"])
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": images,
                                                                              "annotations": annotations}))
    return root


def entry(image_id, name=None) -> dict:
    return {"id": image_id, "file_name": name or f"{image_id:012d}.jpg", "width": 40, "height": 30}


def test_entries_that_cannot_be_used_are_counted_and_reported(tmp_path):
    images = [entry(3), entry(1), entry("2", "000000000002.jpg"), entry(1, "other.jpg"), entry(4), entry(5, 5)]
    annotations = [
        {"id": 10, "image_id": 1, "caption": "a cat on a mat "},
        {"id": 11, "image_id": 1, "caption": None},  # null
        {"id": 12, "image_id": 3, "caption": 7},  # a number
        {"id": 13, "image_id": 3, "caption": "two dogs"},
        {"id": 14, "image_id": "2", "caption": "a red bus"},  # the string id: its image is left out too
        {"id": 15, "image_id": 5, "caption": "a kite"},
        {"id": 16, "image_id": 99, "caption": "nothing shows this"},
    ]
    data = CocoCaptions(write_coco(tmp_path, images, annotations), image_transform(IMAGE_SIZE))
    assert [f.name for f in data.files] == ["000000000001.jpg", "000000000003.jpg"]  # by id, once each
    assert data.captions == [["a cat on a mat"], ["two dogs"]]
    assert data.summary().splitlines() == [
        f"{tmp_path / 'annotations' / 'captions_train2017.json'}: 2 images with 2 captions",
        "  left out 2 annotations whose caption is not text (id 11: None, id 12: 7)",
        "  left out 1 images whose id is not an integer ('2')",
        "  left out 1 repeated image entries (the first is kept) (1)",
        "  left out 1 images without captions (4)",
        "  left out 1 images whose file_name is not text (id 5: 5)",
        "  left out 2 captions of no listed image (image_id '2', image_id 99)",
    ]


def test_a_clean_file_reports_nothing_left_out(tmp_path):
    annotations = [{"id": n, "image_id": n % 2, "caption": f"caption {n}"} for n in range(4)]
    data = CocoCaptions(write_coco(tmp_path, [entry(0), entry(1)], annotations), image_transform(IMAGE_SIZE))
    assert data.summary() == f"{tmp_path / 'annotations' / 'captions_train2017.json'}: 2 images with 4 captions"


def test_images_too_large_to_decode_are_unreadable_not_a_crash(tmp_path, monkeypatch):
    """Above twice PIL's MAX_IMAGE_PIXELS, Image.open raises DecompressionBombError, which is not an
    OSError; above weights.images.MAX_IMAGE_PIXELS the image is refused before it is decoded. Either way the
    item is (None, index, why), which --skip_bad_images counts and skips."""
    annotations = [{"id": n, "image_id": n, "caption": "a cup"} for n in range(2)]
    data = CocoCaptions(write_coco(tmp_path, [entry(0), entry(1)], annotations), image_transform(IMAGE_SIZE))
    assert data[0][0].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels > 2 × 500: PIL's own error
    pixels, index, why = data[1]
    assert pixels is None and index == 1
    assert why.startswith(f"{data.files[1]} is too large to decode safely (")
    monkeypatch.undo()
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)  # ours
    assert data[0][2] == (f"{data.files[0]} is too large to decode safely (40 × 30 pixels to decode; the limit is "
                          f"1,000), so it is treated as unreadable")
    batch, indices, errors = collate([data[0], data[1]])
    assert batch is None and indices == [] and len(errors) == 2


def test_large_images_are_decoded_reduced(tmp_path, monkeypatch):
    """With image_size, an image whose shorter side is ≥ 2 × 4 × image_size is decoded at half size (or less)."""
    from weights import coco

    root = write_coco(tmp_path, [entry(0)], [{"id": 0, "image_id": 0, "caption": "a wide field"}])
    x, y = np.meshgrid(np.linspace(0, 1, 300), np.linspace(0, 1, 260))
    Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8)).save(root / "train2017" / "000000000000.jpg")
    decoded = []
    monkeypatch.setattr(coco, "open_image", lambda *a, **k: decoded.append(images.open_image(*a, **k)) or decoded[-1])
    full = CocoCaptions(root, image_transform(IMAGE_SIZE))[0][0]
    reduced = CocoCaptions(root, image_transform(IMAGE_SIZE), image_size=IMAGE_SIZE)[0][0]
    assert [image.size for image in decoded] == [(300, 260), (150, 130)]  # 130 ≥ 4 × 32
    level = 1 / 255 / min(clip.OPENAI_STD)
    assert (reduced - full).abs().max() <= 3 * level + 1e-6


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.jpg", "a/../../secret.jpg", "..\\secret.jpg",
                                  "C:\\secret.jpg"])
def test_file_names_outside_the_images_folder_are_left_out(tmp_path, name):
    """As Winoground's reader: a file_name that is absolute or goes up with '..' is never read."""
    root = write_coco(tmp_path / "coco", [entry(1)], [{"id": 10, "image_id": 1, "caption": "a cat"},
                                                      {"id": 11, "image_id": 2, "caption": "a dog"}])
    captions = root / "annotations" / "captions_train2017.json"
    data = json.loads(captions.read_text())
    captions.write_text(json.dumps(data | {"images": data["images"] + [entry(2, name)]}))
    dataset = CocoCaptions(root, image_transform(IMAGE_SIZE))
    assert dataset.files == [root / "train2017" / "000000000001.jpg"]
    assert f"left out 1 images whose file_name is absolute or goes up with '..' (id 2: {name!r})" in dataset.summary()

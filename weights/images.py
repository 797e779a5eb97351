"""Reading image files: decode one image safely, or raise one ValueError that names it.

A dataset's images come from anywhere, so each is checked before it is decoded: not an image,
corrupt or truncated, too many pixels to decode (a "decompression bomb"), too thin, or of more
than 8 bits with values that cannot be mapped. A large image is decoded reduced when the
preprocessing (clip.image_transform, sds.sd_image_transform) would shrink it anyway. Used by
train.py and eval_winoground.py, and by clip.py's demo.
"""

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from clip import to_rgb

# Images that would decode to more pixels than this are refused as unreadable: 40 megapixels take
# 120 MB as RGB, while a "decompression bomb" (a small file claiming 12000 × 12000 pixels or more)
# would take gigabytes in every DataLoader worker. COCO's images are at most 640 × 640, Winoground's
# 1920 × 1280.
MAX_IMAGE_PIXELS = 40_000_000
# A large image is decoded at 1/2, 1/4 or 1/8 of its size (JPEG's DCT scaling; a box filter for
# other formats) as long as its shorter side stays at least this many times the side it is then
# resized to. The bicubic resize still averages ≥ 4 decoded pixels per output pixel, and the
# preprocessed image moves by at most 3 of 255 levels (0.4 on average; tests/test_clip.py checks
# it). COCO's and Winoground's images are too small for it ever to apply at CLIP's 224 or SD's 512.
REDUCED_DECODE_MARGIN = 4
# Thinner images are refused: the resize brings the shorter side to S, and the longer one to
# ratio × S (a 20000 × 1 PNG of 143 bytes would become 4.5 million × 224 pixels, 3 GB). Even
# panoramas are rarely beyond 10:1.
MAX_ASPECT_RATIO = 20


def open_image(source, name: str | Path | None = None, size: int | None = None) -> Image.Image:
    """Open and decode an image (a path or a file object), or raise one ValueError naming it: not an
    image, corrupt or truncated, more than MAX_IMAGE_PIXELS to decode or thinner than
    1:MAX_ASPECT_RATIO (both checked before decoding), or of more than 8 bits with values it cannot
    map (see to_8_bits). With `size`, the side the preprocessing resizes the shorter side to, a
    large image is decoded reduced (see REDUCED_DECODE_MARGIN): a large JPEG is then never decoded
    at full size at all. A missing file raises FileNotFoundError."""
    name = name if name is not None else source
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 megapixels on: the check below is stricter, and counts what is
            # decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        full_width = image.width
        factor = 1  # the largest of 1, 2, 4, 8 that leaves the shorter side ≥ the margin × size
        while (size and factor < 8
               and min(image.size) // (2 * factor) >= REDUCED_DECODE_MARGIN * size):
            factor *= 2
        if factor > 1 and image.format == "JPEG":
            image.draft(None, (image.width // factor, image.height // factor))  # scaled in the DCT
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{image.width} × {image.height} pixels to decode")
        if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
            raise ValueError(f"{image.width} × {image.height} pixels, one side more than "
                             f"{MAX_ASPECT_RATIO} times the other: crop it")
        image.load()
        image = to_8_bits(image)
        factor //= round(full_width / image.width)  # what draft did not do
        # RGB first, as image_transform does before it resamples (a palette cannot be averaged)
        if factor > 1:
            image = to_rgb(image).reduce(factor)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as err:  # ours, or PIL's own above 179 megapixels
        raise ValueError(f"{name} is too large to decode safely ({err}; the limit is "
                         f"{MAX_IMAGE_PIXELS:,}), so it is treated as unreadable") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not a readable image (unknown format or corrupt "
                         f"file)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or damaged files
        raise ValueError(f"{name} is not a readable image ({err})") from None
    return image


def to_8_bits(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images (modes I;16*, I) → L as 16-bit values (÷ 257: 16-bit PNGs and
    TIFFs), float ones (F) as values from 0 to 1 (× 255); other values raise a ValueError. PIL's
    own conversion would clip them to 0–255: all white, or all black."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    top = 1.0 if image.mode == "F" else 65535
    low, high = image.getextrema()
    if not 0 <= low <= high <= top:  # also refuses NaN
        raise ValueError(f"mode {image.mode} with values from {low} to {high}, beyond the 0 to "
                         f"{top} that can be mapped to 8 bits: save it as an 8-bit image")
    # + 0.5: convert truncates.
    return image.convert("F").point(lambda v: v * 255 / top + 0.5).convert("L")


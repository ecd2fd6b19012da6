"""Images from users: bytes, files and `data:` URLs -> checked RGB pixel tensors, or one clear ImageError.

The rules: at most MAX_IMAGE_BYTES encoded and MAX_PIXELS decoded (a small PNG can decode to gigabytes),
one of the MODES (palette and grey images become RGB, transparency is dropped onto black), and only inline
images: a model server must not fetch URLs its clients name.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

import torch

from gptlab.errors import GptlabError

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
MODES = ("RGB", "RGBA", "L", "LA", "P", "1")
DATA_URL = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+)?(;[^,]*)?,", re.ASCII)


class ImageError(GptlabError):
    """An image that cannot be used: not an image, too large, an unsupported mode or a remote URL."""


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL; an http(s) URL is refused (inline images only)."""
    if not isinstance(url, str):
        raise ImageError("an image URL must be a string")
    match = DATA_URL.match(url)
    if not match:
        raise ImageError("only inline images are accepted: send the image as a data:image/...;base64,... URL, "
                         "not a link to it")
    if ";base64" not in (match.group(2) or ""):
        raise ImageError("an image data: URL must be base64-encoded (data:image/png;base64,...)")
    payload = url[match.end():]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ImageError(f"the image is larger than the {MAX_IMAGE_BYTES // (1024 * 1024)} MB limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image data: URL is not valid base64") from None


def load_image(source: bytes | str | Path, size: int) -> torch.Tensor:
    """Pixels (3, size, size) in [0, 1] of an encoded image (bytes, or a file path)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: larger than the {MAX_IMAGE_BYTES // (1024 * 1024)} MB image limit")
        data, name = path.read_bytes(), str(path)
    else:
        data, name = bytes(source), "the image"
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"the image is larger than the {MAX_IMAGE_BYTES // (1024 * 1024)} MB limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {MAX_PIXELS:,}")
            if image.mode not in MODES:
                raise ImageError(f"{name}: unsupported image mode {image.mode} (use one of {', '.join(MODES)})")
            image.load()
            rgb = _to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{name} is not a readable image ({type(err).__name__})") from None
    return pixels_of(rgb)


def _to_rgb(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def pixels_of(rgb) -> torch.Tensor:
    """(3, H, W) float pixels in [0, 1] of a PIL RGB image."""
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.size[1], rgb.size[0], 3).permute(2, 0, 1).float() / 255

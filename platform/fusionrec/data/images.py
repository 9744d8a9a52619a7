"""Image paths inside a dataset folder: resolved safely, opened with a pixel budget."""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

# 64 megapixels (8192 x 8192): far above any product photo, far below a decompression bomb.
MAX_IMAGE_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageProblem(ValueError):
    """An image reference that cannot be used; the message says why."""


def resolve_image_path(root: Path, value: str) -> Path:
    """The file an `image` cell names, which must stay inside the dataset folder `root`."""
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or value.startswith("\\"):
        raise ImageProblem(f"absolute image path {value!r} not allowed: paths are relative to the dataset folder")
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        raise ImageProblem(f"image path {value!r} leaves the dataset folder ('..')")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, value))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ImageProblem(f"image path {value!r} resolves outside the dataset folder (symlink)")
    path = Path(real)
    if not path.is_file():
        raise ImageProblem(f"image file not found: {value}")
    return path


def open_image(path: Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open and fully decode an image (a file, or bytes in a file object) as RGB, refusing anything
    over MAX_IMAGE_PIXELS before decoding. `name`: what an error calls it (default: the file's name)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageProblem(
                        f"image is {width}x{height} ({width * height:,} pixels), over the limit of "
                        f"{MAX_IMAGE_PIXELS:,}: refused as a possible decompression bomb"
                    )
                img.load()
                return img.convert("RGB")
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem(f"refused as a possible decompression bomb: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
        name = name or (path.name if isinstance(path, Path) else "data")
        reason = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ImageProblem(f"undecodable image {name}: {reason}".splitlines()[0]) from exc

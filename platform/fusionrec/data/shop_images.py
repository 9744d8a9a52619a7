"""Pictures for the synthetic shop: a product photo per item, a profile picture per user.

A product photo is a dress silhouette (by style) filled with its colour and pattern; a profile
picture shows a person wearing their favourite dress (style, colour, pattern), so the image-only
factors of both sides are visible to an image encoder and to nothing else.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fusionrec.data.shop_vocab import COLOURS, PATTERNS, STYLES

COLOUR_RGB = list(COLOURS.values())

# Silhouettes on a unit square: (x, y) points, neckline at top, hem at bottom.
SILHOUETTES = {
    "a-line": [(0.40, 0.10), (0.60, 0.10), (0.64, 0.38), (0.80, 0.92), (0.20, 0.92), (0.36, 0.38)],
    "bodycon": [(0.38, 0.10), (0.62, 0.10), (0.64, 0.30), (0.58, 0.50), (0.62, 0.90), (0.38, 0.90),
                (0.42, 0.50), (0.36, 0.30)],
    "shift": [(0.34, 0.10), (0.66, 0.10), (0.68, 0.90), (0.32, 0.90)],
    "wrap": [(0.36, 0.10), (0.50, 0.34), (0.64, 0.10), (0.66, 0.40), (0.74, 0.90), (0.26, 0.90),
             (0.34, 0.40)],
    "fit-and-flare": [(0.40, 0.10), (0.60, 0.10), (0.60, 0.42), (0.88, 0.84), (0.12, 0.84), (0.40, 0.42)],
    "slip": [(0.42, 0.08), (0.46, 0.08), (0.50, 0.16), (0.54, 0.08), (0.58, 0.08), (0.62, 0.92),
             (0.38, 0.92)],
}


@dataclass(frozen=True)
class Picture:
    """What one image shows; `portrait` adds a head and shrinks the dress below it."""

    path: Path
    style: int
    colour: int
    pattern: int
    portrait: bool
    seed: tuple[int, ...]


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (30, 30, 30) if luminance > 140 else (240, 240, 240)


def _pattern_layer(size: int, pattern: str, base: tuple, ink: tuple, rng: np.random.Generator) -> Image.Image:
    layer = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(layer)
    step = max(4, size // int(rng.integers(7, 11)))
    if pattern == "striped":
        for y in range(0, size, step):
            draw.rectangle([0, y, size, y + step // 3], fill=ink)
    elif pattern == "polka dot":
        r = max(1, step // 5)
        for y in range(step // 2, size, step):
            for x in range((y // step % 2) * step // 2, size, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif pattern == "floral":
        r = max(1, step // 6)
        for _ in range(size * size // (step * step)):
            cx, cy = (int(v) for v in rng.integers(0, size, 2))
            for dx, dy in ((0, -r), (r, 0), (0, r), (-r, 0)):
                draw.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=ink)
            draw.ellipse([cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2], fill=(238, 198, 44))
    elif pattern == "checked":
        for i in range(0, size, step):
            draw.rectangle([i, 0, i + step // 4, size], fill=ink)
            draw.rectangle([0, i, size, i + step // 4], fill=ink)
    elif pattern == "geometric":
        for y in range(0, size, step):
            for x in range(0, size, step):
                draw.polygon([(x, y + step), (x + step // 2, y), (x + step, y + step)], outline=ink)
    return layer


def render(picture: Picture, size: int) -> Image.Image:
    rng = np.random.default_rng(picture.seed)
    background = tuple(int(v) for v in rng.integers(200, 250, 3))
    image = Image.new("RGB", (size, size), background)
    scale, top = (0.62, 0.36) if picture.portrait else (1.0, 0.0)
    jitter = rng.uniform(-0.03, 0.03, 2)
    points = [
        (size * (0.5 + (x - 0.5) * scale + jitter[0]), size * (top + y * scale + jitter[1]))
        for x, y in SILHOUETTES[STYLES[picture.style]]
    ]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    base = COLOUR_RGB[picture.colour]
    cloth = _pattern_layer(size, PATTERNS[picture.pattern], base, _contrast(base), rng)
    image.paste(cloth, (0, 0), mask)
    ImageDraw.Draw(image).polygon(points, outline=_contrast(background))
    if picture.portrait:
        skin = [(241, 194, 160), (198, 134, 96), (141, 85, 54), (255, 219, 172)][int(rng.integers(0, 4))]
        r, cx, cy = size * 0.14, size * (0.5 + jitter[0]), size * (0.22 + jitter[1])
        ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r], fill=skin)
    return image


def _render_chunk(pictures: list[Picture], size: int) -> int:
    for picture in pictures:
        render(picture, size).save(picture.path, format="PNG")
    return len(pictures)


def render_all(pictures: list[Picture], size: int, workers: int) -> None:
    """Render and save every picture, in `workers` processes, with a progress bar."""
    for folder in {p.path.parent for p in pictures}:
        folder.mkdir(parents=True, exist_ok=True)
    chunks = [pictures[i:i + 256] for i in range(0, len(pictures), 256)]
    with tqdm(total=len(pictures), desc="rendering images", unit="img", disable=None) as bar:
        if workers <= 1:
            for chunk in chunks:
                bar.update(_render_chunk(chunk, size))
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for done in pool.map(_render_chunk, chunks, [size] * len(chunks)):
                bar.update(done)

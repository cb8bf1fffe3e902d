"""Grids of labelled tiles: the pieces of the pictures `vqtok eval` (and `vqtok fit`'s evaluations) and
`vqtok prior fit` draw, so that the two read alike.

Each image becomes a tile enlarged by a whole factor, nearest neighbour (`tile_scale`, `enlarge`), tiles side
by side are GAP black pixels apart, and text goes in bands of BAND pixels: white on black in Pillow's default
font (`draw_texts`), cut at the front with "..." where it is wider than its room. Each picture lays out its own
rows and bands.
"""

from __future__ import annotations

import numpy as np

MIN_TILE = 128  # pixels: smaller images are enlarged until their shorter side is at least this
FONT_SIZE, BAND = 12, 18  # pixels: the text (Pillow's default font), and the band that holds a line of it
GAP = 4  # black pixels between tiles side by side, without which images of noise run into each other


def tile_scale(height: int, width: int) -> int:
    """The whole factor by which a picture enlarges an image, nearest neighbour: the least that makes its
    shorter side at least MIN_TILE pixels (4 for 32 px crops). Images that large already keep their size (1);
    none is ever shrunk."""
    return max(1, -(-MIN_TILE // min(height, width)))


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) -> (scale * H, scale * W, 3), each pixel a scale x scale square."""
    return image.repeat(scale, 0).repeat(scale, 1)


def draw_texts(pixels: np.ndarray, texts: list[tuple[int, int, int, str]]) -> np.ndarray:
    """uint8 (H, W, 3) pixels with each (x, y, room, text) written in white, its top left corner 3 pixels right
    of and 2 below (x, y), cut to fit room pixels less 6."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    for x, y, room, text in texts:
        draw.text((x + 3, y + 2), _fit(text, font, room - 6), fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def _fit(text: str, font, room: float) -> str:
    """text, or its end after "..." if it is wider than room pixels: the end of a key or a path tells most."""
    if font.getlength(text) <= room:
        return text
    for start in range(1, len(text)):
        if font.getlength("..." + text[start:]) <= room:
            return "..." + text[start:]
    return ""

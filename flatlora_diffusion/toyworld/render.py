"""The procedural renderer: a `Scene` to a 64x64 RGB image, deterministically.

Backgrounds are drawn from simple fields (sky gradients, sand speckle, bricks, stars, ripples)
whose random parts come from a generator seeded with `Scene.seed`; objects are signed-distance
shapes with anti-aliased edges, a dark outline, light shading and a surface pattern. The same
`Scene` always gives the same pixels (single-threaded elementwise torch ops on the CPU).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from flatlora_diffusion.toyworld.world import COLOURS, IMAGE_SIZE, Scene

_WHITE = torch.tensor([0.97, 0.97, 0.97])
_N = IMAGE_SIZE


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (y, x), each (N, N), in pixels."""
    axis = torch.arange(_N, dtype=torch.float32) + 0.5
    return torch.meshgrid(axis, axis, indexing="ij")


def _rgb(colour: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32).view(3, 1, 1)


def _vertical(top: tuple, bottom: tuple, y: torch.Tensor) -> torch.Tensor:
    t = (y / _N).unsqueeze(0)
    return _rgb(top) * (1 - t) + _rgb(bottom) * t


def _sky_over(ground: torch.Tensor, horizon: float, sky_top: tuple, sky_bottom: tuple, y: torch.Tensor) -> torch.Tensor:
    sky = _vertical(sky_top, sky_bottom, y)
    return torch.where((y < horizon * _N).unsqueeze(0), sky, ground)


def _grass(g: torch.Generator, y, x) -> torch.Tensor:
    blades = torch.rand(_N, generator=g).view(1, _N) * 0.18  # a streak per column
    speckle = torch.rand(_N, _N, generator=g) * 0.08
    shade = (0.75 + blades + speckle).unsqueeze(0)
    ground = _rgb((0.30, 0.62, 0.18)) * shade
    return _sky_over(ground, 0.25 + 0.15 * float(torch.rand((), generator=g)), (0.45, 0.68, 0.95), (0.72, 0.85, 0.98), y)


def _beach(g: torch.Generator, y, x) -> torch.Tensor:
    speckle = (0.92 + torch.rand(_N, _N, generator=g) * 0.10).unsqueeze(0)
    sand = _rgb((0.93, 0.82, 0.58)) * speckle
    sea_top = 0.22 + 0.10 * float(torch.rand((), generator=g))
    sea_bottom = sea_top + 0.12 + 0.06 * float(torch.rand((), generator=g))
    sea = _rgb((0.12, 0.45, 0.75)) * (0.9 + 0.1 * torch.sin(x / 3.0 + y)).unsqueeze(0)
    ground = torch.where((y < sea_bottom * _N).unsqueeze(0), sea, sand)
    return _sky_over(ground, sea_top, (0.50, 0.75, 0.98), (0.80, 0.90, 1.00), y)


def _snow(g: torch.Generator, y, x) -> torch.Tensor:
    shadow = torch.rand(_N, _N, generator=g) * 0.05 + 0.03 * torch.sin(x / 7.0 + float(torch.rand((), generator=g)) * 6)
    ground = _rgb((0.95, 0.96, 1.00)) - shadow.unsqueeze(0) * _rgb((0.6, 0.5, 0.2))
    return _sky_over(ground, 0.30 + 0.15 * float(torch.rand((), generator=g)), (0.66, 0.72, 0.82), (0.82, 0.85, 0.90), y)


def _night(g: torch.Generator, y, x) -> torch.Tensor:
    image = _vertical((0.02, 0.02, 0.10), (0.06, 0.08, 0.25), y).clone()
    stars = torch.rand(_N, _N, generator=g) > 0.985
    image = torch.where(stars.unsqueeze(0), _rgb((1.0, 1.0, 0.9)), image)
    mx, my = 8 + 48 * float(torch.rand((), generator=g)), 5 + 12 * float(torch.rand((), generator=g))
    moon = ((x - mx) ** 2 + (y - my) ** 2).sqrt() < 4.5
    return torch.where(moon.unsqueeze(0), _rgb((0.98, 0.95, 0.75)), image)


def _brick(g: torch.Generator, y, x) -> torch.Tensor:
    oy, ox = float(torch.rand((), generator=g)) * 8, float(torch.rand((), generator=g)) * 16
    row = torch.floor((y + oy) / 8)
    shifted = x + ox + 8 * (row % 2)
    column = torch.floor(shifted / 16)
    mortar = ((y + oy) % 8 < 1.3) | (shifted % 16 < 1.3)
    tone = torch.rand(64, 64, generator=g)[row.long() % 64, column.long() % 64] * 0.25 + 0.80
    bricks = _rgb((0.68, 0.26, 0.16)) * tone.unsqueeze(0)
    return torch.where(mortar.unsqueeze(0), _rgb((0.80, 0.77, 0.70)), bricks)


def _water(g: torch.Generator, y, x) -> torch.Tensor:
    phase = float(torch.rand((), generator=g)) * 2 * math.pi
    ripple = torch.sin(2 * math.pi * (y / 7.0 + 0.35 * torch.sin(x / 6.0 + phase)))
    base = _vertical((0.10, 0.32, 0.62), (0.05, 0.22, 0.50), y)
    return torch.where((ripple > 0.75).unsqueeze(0), _rgb((0.55, 0.75, 0.95)), base)


BACKGROUNDS = {"grass": _grass, "beach": _beach, "snow": _snow, "night": _night, "brick": _brick, "water": _water}


def _box(px, py, half_x, half_y):
    return torch.maximum(px.abs() - half_x, py.abs() - half_y)


def _object_sdf(kind: str, px: torch.Tensor, py: torch.Tensor, s: float) -> tuple[torch.Tensor, tuple[float, float]]:
    """Signed distance (pixels, negative inside) of the object, and the centre of its main body."""
    if kind == "ball":
        return (px**2 + py**2).sqrt() - s, (0.0, 0.0)
    if kind == "box":
        return _box(px, py, 0.85 * s, 0.85 * s), (0.0, 0.0)
    if kind == "cup":
        body = _box(px + 0.15 * s, py, 0.6 * s, 0.75 * s)
        handle = (((px - 0.55 * s) ** 2 + py**2).sqrt() - 0.33 * s).abs() - 0.11 * s
        return torch.minimum(body, handle), (-0.15 * s, 0.0)
    if kind == "cone":
        norm = math.hypot(2.0, 0.8)
        right = (2.0 * px - 0.8 * (py + s)) / norm
        left = (-2.0 * px - 0.8 * (py + s)) / norm
        return torch.maximum(torch.maximum(right, left), py - s), (0.0, 0.35 * s)
    if kind == "kite":
        return (px.abs() / 0.65 + py.abs() - s) * 0.55, (0.0, 0.0)
    if kind == "bottle":
        body = _box(px, py - 0.4 * s, 0.45 * s, 0.6 * s)
        neck = _box(px, py + 0.6 * s, 0.18 * s, 0.45 * s)
        return torch.minimum(body, neck), (0.0, 0.4 * s)
    raise ValueError(f"Unknown object {kind!r}.")


def _pattern_mask(pattern: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where the pattern's second colour shows, in object coordinates u, v (about [-1, 1])."""
    if pattern == "plain":
        return torch.zeros_like(u)
    if pattern == "striped":
        return (torch.sin(math.pi * (u + v) * 2.2) > 0).float()
    if pattern == "dotted":
        fu, fv = (u / 0.5) % 1 - 0.5, (v / 0.5) % 1 - 0.5
        return ((fu**2 + fv**2).sqrt() < 0.24).float()
    if pattern == "checkered":
        return ((torch.floor(u / 0.45) + torch.floor(v / 0.45)) % 2).float()
    if pattern == "halves":
        return (v > 0).float()
    raise ValueError(f"Unknown pattern {pattern!r}.")


def _mark_mask(mark: str, px: torch.Tensor, py: torch.Tensor, s: float) -> torch.Tensor:
    if mark == "none":
        return torch.zeros_like(px)
    if mark == "cross":
        arm, width = 0.36 * s, 0.11 * s
        return ((px.abs() < arm) & (py.abs() < width) | (py.abs() < arm) & (px.abs() < width)).float()
    if mark == "disc":
        return ((px**2 + py**2).sqrt() < 0.3 * s).float()
    raise ValueError(f"Unknown mark {mark!r}.")


def render(scene: Scene) -> torch.Tensor:
    """The scene as a float image (3, 64, 64) in [0, 1]."""
    g = torch.Generator().manual_seed(scene.seed)
    y, x = _grid()
    image = BACKGROUNDS[scene.scene](g, y, x)
    s = scene.size * _N
    px, py = x - scene.x * _N, y - scene.y * _N
    sdf, (bx, by) = _object_sdf(scene.object, px, py, s)
    u, v = px / s, py / s
    first = _rgb(COLOURS[scene.colour])
    second = _rgb(COLOURS[scene.colour2]) if scene.colour2 else 0.45 * first + 0.55 * _WHITE.view(3, 1, 1)
    m = _pattern_mask(scene.pattern, (px - bx) / s, (py - by) / s if scene.pattern == "halves" else v).unsqueeze(0)
    surface = first * (1 - m) + second * m
    mark = _mark_mask(scene.mark, px - bx, py - by, s).unsqueeze(0)
    surface = surface * (1 - mark) + _WHITE.view(3, 1, 1) * mark
    shade = (1.0 - 0.12 * (u + v) / 2).clamp(0.8, 1.15).unsqueeze(0)
    surface = (surface * shade).clamp(0, 1)
    fill = (0.5 - sdf).clamp(0, 1).unsqueeze(0)
    outline = (0.5 - (sdf - 1.2)).clamp(0, 1).unsqueeze(0)
    image = image * (1 - outline) + 0.12 * image * (outline - fill) + surface * fill
    return image.clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) float image in [0, 1] as an 8-bit Pillow image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, mode="RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a (3, H, W) float tensor in [0, 1]."""
    return torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).view(
        image.height, image.width, 3).permute(2, 0, 1).float() / 255

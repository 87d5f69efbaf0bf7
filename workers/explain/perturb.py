"""Image perturbations of the Model Inspector (papers/u-analysis-and-model-inspector §4.1,
§4.3), built as tensors on the model's device, a batch at a time (never image by image in PIL):

- texture noises with the ImageNet-C constants (Hendrycks & Dietterich 2019), in pixel space
  ``[0, 1]`` (:class:`workers.explain.u_analysis.PixelSpace`), clipped and quantised to 8 bits
  as ImageNet-C's saved images are;
- structure shuffles (patch, horizontal, vertical) as pixel permutations that move every tile;
- fills of a region (white, black, mean, blur, Gaussian, textures) for signal/context images.

Random draws come from a numpy ``Generator`` (PCG64, fast normal and Poisson draws) seeded
per (job seed, image, what is drawn), then move to the device: the same seed gives the same
bytes whatever the batching, and the same draws on the CPU and a GPU.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import torch

from schemas.inspector import GAUSSIAN_STD, IMPULSE_AMOUNT, SHOT_RATE, Fill, Transform, shuffle_tiles
from workers.explain.u_analysis import PixelSpace


def generator(seed: int, *keys: int | str) -> np.random.Generator:
    """The generator of one random stream: ``(seed, *keys)``, strings hashed with CRC-32."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence([seed, *ints]))


def _draw(fn: str, shape: tuple[int, ...], gen: np.random.Generator, device: torch.device) -> torch.Tensor:
    """``randn`` (standard normal) or ``rand`` (uniform [0, 1)) float32 of ``shape`` on ``device``."""
    a = gen.standard_normal(shape, np.float32) if fn == "randn" else gen.random(shape, np.float32)
    return torch.from_numpy(a).to(device)


def quantise(u: torch.Tensor) -> torch.Tensor:
    """Clip to ``[0, 1]`` and round to the 8-bit grid (what a saved PNG holds)."""
    return (u.clamp(0, 1) * 255).round() / 255


def setting(t: Transform) -> dict[str, float | int]:
    """The constant a transform's severity stands for (documented in the result)."""
    k = t.severity - 1
    if t.name == "gaussian_noise":
        return {"std": GAUSSIAN_STD[k]}
    if t.name == "shot_noise":
        return {"rate": SHOT_RATE[k]}
    if t.name == "impulse_noise":
        return {"amount": IMPULSE_AMOUNT[k]}
    return {"tiles": shuffle_tiles(t.severity)}


def noise(u: torch.Tensor, t: Transform, gen: np.random.Generator) -> torch.Tensor:
    """ImageNet-C noise of ``u`` ``(C, H, W)`` in pixel space (``t.name`` a noise):

    - ``gaussian_noise``: ``u + N(0, std²)``;
    - ``shot_noise``: ``Poisson(u * rate) / rate``;
    - ``impulse_noise``: each value (pixel and channel) with probability ``amount`` set to 0
      or 1, half each (skimage ``random_noise(mode='s&p', amount=amount)``).
    """
    k = t.severity - 1
    if t.name == "gaussian_noise":
        out = u + GAUSSIAN_STD[k] * _draw("randn", tuple(u.shape), gen, u.device)
    elif t.name == "shot_noise":
        rate = SHOT_RATE[k]
        lam = (u.clamp(0, 1) * rate).cpu().numpy()
        out = torch.from_numpy(gen.poisson(lam).astype(np.float32)).to(u.device) / rate
    else:
        hit = _draw("rand", tuple(u.shape), gen, u.device) < IMPULSE_AMOUNT[k]
        salt = (_draw("rand", tuple(u.shape), gen, u.device) < 0.5).to(u.dtype)
        out = torch.where(hit, salt, u)
    return quantise(out)


def derangement(n: int, gen: np.random.Generator) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (``n >= 2``): every tile moves
    (rejection sampling: about e draws on average)."""
    while True:
        p = gen.permutation(n)
        if not (p == np.arange(n)).any():
            return torch.from_numpy(p)


def shuffle_source(t: Transform, h: int, w: int, gen: np.random.Generator) -> torch.Tensor:
    """``(H*W,)`` long: for each output pixel (raster order) the input pixel it takes.

    ``n = 2**severity`` tiles per side: ``patch_shuffle`` cuts the image into ``n x n`` squares
    of ``H//n x W//n`` pixels, ``horizontal_shuffle`` into ``n`` full-width stripes of height
    ``H//n``, ``vertical_shuffle`` into ``n`` full-height stripes of width ``W//n``; the tiles
    are permuted by a derangement. When ``n`` does not divide a side, the last ``H mod n``
    rows / ``W mod n`` columns stay in place (tiles must be the same size to swap)."""
    n = shuffle_tiles(t.severity)
    rows, cols = (n, n) if t.name == "patch_shuffle" else (n, 1) if t.name == "horizontal_shuffle" else (1, n)
    th, tw = h // rows, w // cols
    if th < 1 or tw < 1:
        raise ValueError(f"{t.name} with {n} tiles per side does not fit a {h}x{w} input")
    perm = derangement(rows * cols, gen)
    src = torch.arange(h * w).reshape(h, w)
    tiles = src[: rows * th, : cols * tw].reshape(rows, th, cols, tw).permute(0, 2, 1, 3).reshape(rows * cols, th, tw)
    moved = tiles[perm].reshape(rows, cols, th, tw).permute(0, 2, 1, 3).reshape(rows * th, cols * tw)
    src[: rows * th, : cols * tw] = moved
    return src.reshape(-1)


def gather(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., H, W)`` with its pixels taken from ``source`` ``(H*W,)``."""
    flat = x.reshape(*x.shape[:-2], -1)
    return flat[..., source.to(x.device)].reshape(x.shape)


def unshuffle(map2d: np.ndarray, source: np.ndarray) -> np.ndarray:
    """A map of the shuffled image back on the original's pixels (``out[source] = map``)."""
    out = np.zeros(map2d.size, map2d.dtype)
    out[source] = map2d.ravel()
    return out.reshape(map2d.shape)


def transformed(
    x: torch.Tensor,
    transforms: list[Transform],
    space: PixelSpace,
    seed: int,
    index: int,
    mask: torch.Tensor | None = None,
    keep_inside: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``(T, C, H, W)`` model inputs: ``x`` ``(C, H, W)`` (image number ``index``) under each
    transform, and per transform the pixel source ``(H*W,)`` of a shuffle (None for a noise).
    With ``mask`` ``(H, W)`` bool, only part of the image changes: the outside when
    ``keep_inside`` (background), the inside otherwise (signal); the shuffle's source is then
    the identity on the kept pixels."""
    u = space.to_pixels(x)
    out, sources = [], []
    for t in transforms:
        gen = generator(seed, index, t.name, t.severity)
        if t.name in ("gaussian_noise", "shot_noise", "impulse_noise"):
            y, src = space.to_model(noise(u, t, gen)), None
        else:
            src = shuffle_source(t, x.shape[1], x.shape[2], gen)
            y = gather(x, src)
        if mask is not None:
            keep = mask.to(x.device) if keep_inside else ~mask.to(x.device)
            y = torch.where(keep, x, y)
            if src is not None:
                src = torch.where(keep.reshape(-1).cpu(), torch.arange(src.numel()), src)
        out.append(y)
        sources.append(src)
    return torch.stack(out), sources


# --- fills ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _texture(name: str) -> np.ndarray:
    from skimage import data

    return np.asarray(getattr(data, name)(), np.float32) / 255.0


def texture(name: str, h: int, w: int, channels: int, device: torch.device) -> torch.Tensor:
    """``(C, H, W)`` pixel space: scikit-image's greyscale ``brick``/``grass``/``gravel``
    (512x512) resized to the input (bilinear), on every channel."""
    t = torch.from_numpy(_texture(name))[None, None]
    t = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0]
    return t.expand(channels, h, w).to(device)


def fill_pixels(
    fill: Fill, u: torch.Tensor, blur_sigma: float, gaussian_std: float, gen: np.random.Generator
) -> torch.Tensor:
    """The replacement ``(C, H, W)`` in pixel space for the image ``u`` ``(C, H, W)``:
    ``blur_sigma`` a fraction of the longer side; ``gaussian``: ``N(0.5, gaussian_std²)``."""
    c, h, w = u.shape
    if fill == "white":
        return torch.ones_like(u)
    if fill == "black":
        return torch.zeros_like(u)
    if fill == "mean":
        return u.mean(dim=(1, 2), keepdim=True).expand_as(u)
    if fill == "blur":
        return blur(u, blur_sigma * max(h, w))
    if fill == "gaussian":
        return quantise(0.5 + gaussian_std * _draw("randn", (c, h, w), gen, u.device))
    return texture(fill, h, w, c, u.device)


def blur(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, H, W)`` (reflect padding, radius ``3 sigma``)."""
    radius = max(1, int(3 * sigma + 0.5))
    k = torch.arange(-radius, radius + 1, dtype=u.dtype, device=u.device)
    k = torch.exp(-0.5 * (k / max(sigma, 1e-6)) ** 2)
    k = k / k.sum()
    c = u.shape[0]
    x = u[None]
    pad_h, pad_w = min(radius, u.shape[1] - 1), min(radius, u.shape[2] - 1)
    x = torch.nn.functional.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x
    kw = k[radius - pad_w : radius + pad_w + 1]
    x = torch.nn.functional.conv2d(x, kw.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    x = torch.nn.functional.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else x
    kh = k[radius - pad_h : radius + pad_h + 1]
    x = torch.nn.functional.conv2d(x, kh.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    return x[0]

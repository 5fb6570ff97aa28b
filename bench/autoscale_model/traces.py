"""Seeded request traces: arrival time, images (pixels each), prompt tokens, output tokens.

Three shapes, each regenerated bit for bit from its seed (`generate(name, seed)`), or saved as CSV
with `save_csv`:
- `image_burst`: light mixed traffic, then ten minutes of image-heavy traffic arriving within a minute;
- `text_day`: a day of mostly text traffic (night trough, morning ramp, afternoon peak, short spikes),
  compressed 12x into two hours so the run takes seconds (ramps are therefore 12x steeper than real);
- `shifting_mix`: steady total rate whose image share moves 10% -> 80% -> 10%.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PIXELS_PER_TOKEN = 28 * 28  # dots ViT: 14x14 patches, 2x2 merged into one LLM token


@dataclass(frozen=True)
class Request:
    id: int
    t: float  # arrival, seconds from the trace start
    image_pixels: tuple[int, ...]  # one entry per image (after the preprocessing's resize)
    prompt_tokens: int  # text tokens of the prompt (image tokens come on top)
    output_tokens: int

    @property
    def has_images(self) -> bool:
        return bool(self.image_pixels)

    @property
    def pixels(self) -> int:
        return sum(self.image_pixels)

    @property
    def image_tokens(self) -> int:
        return sum(p // PIXELS_PER_TOKEN for p in self.image_pixels)

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens + self.image_tokens


@dataclass(frozen=True)
class Trace:
    name: str
    seed: int
    duration_s: float
    requests: list[Request]
    description: str

    def summary(self) -> dict:
        img = [r for r in self.requests if r.has_images]
        return {"name": self.name, "seed": self.seed, "duration_s": self.duration_s, "requests": len(self.requests),
                "image_requests": len(img), "images": sum(len(r.image_pixels) for r in img),
                "megapixels": round(sum(r.pixels for r in img) / 1e6, 1),
                "prompt_tokens_mean": round(float(np.mean([r.prompt_tokens for r in self.requests])), 1),
                "output_tokens_mean": round(float(np.mean([r.output_tokens for r in self.requests])), 1),
                "peak_rate_per_s": _peak_rate(self.requests, 60.0), "description": self.description}


def _peak_rate(reqs: list[Request], window: float) -> float:
    if not reqs:
        return 0.0
    counts = np.bincount(np.array([int(r.t // window) for r in reqs]))
    return round(float(counts.max()) / window, 2)


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, lo: float, hi: float) -> float:
    mu = math.log(mean) - sigma * sigma / 2  # so that the mean before clipping is `mean`
    return float(min(hi, max(lo, rng.lognormal(mu, sigma))))


def _build(name: str, seed: int, duration: float, rate: Callable[[float], float], image_share: Callable[[float], float],
           description: str) -> Trace:
    """Non-homogeneous Poisson arrivals, one draw per second; request shapes by modality."""
    rng = np.random.default_rng(seed)
    out: list[Request] = []
    for sec in range(int(duration)):
        n = rng.poisson(max(rate(sec + 0.5), 0.0))
        for t in np.sort(sec + rng.random(n)):
            if rng.random() < image_share(float(t)):
                k = int(min(4, 1 + rng.geometric(0.55) - 1))  # 1 image mostly, up to 4
                pixels = tuple(int(_lognormal(rng, 1.0e6, 0.6, 0.1e6, 4.0e6)) for _ in range(k))
                prompt = int(_lognormal(rng, 250, 0.8, 16, 4000))
                output = int(_lognormal(rng, 250, 0.7, 8, 2048))
            else:
                pixels = ()
                prompt = int(_lognormal(rng, 1200, 0.9, 32, 16000))
                output = int(_lognormal(rng, 300, 0.8, 8, 2048))
            out.append(Request(len(out), float(t), pixels, prompt, output))
    return Trace(name, seed, duration, out, description)


def _smooth_step(t: float, start: float, width: float) -> float:
    x = min(1.0, max(0.0, (t - start) / width))
    return x * x * (3 - 2 * x)


def image_burst(seed: int = 1, scale: float = 1.0) -> Trace:
    def rate(t: float) -> float:
        burst = _smooth_step(t, 600, 60) * (1 - _smooth_step(t, 1200, 60))
        return scale * (4.0 + 14.0 * burst)

    def share(t: float) -> float:
        burst = _smooth_step(t, 600, 60) * (1 - _smooth_step(t, 1200, 60))
        return (0.2 * 4.0 + 1.0 * 14.0 * burst) / (4.0 + 14.0 * burst)

    return _build("image_burst", seed, 1800, rate, share,
                  "30 min: 4 req/s (20% with images); at 10 min +14 req/s of image requests arrive within a "
                  "minute and stay for 10 min")


def text_day(seed: int = 2, scale: float = 1.0, compress: float = 12.0) -> Trace:
    day_s = 86400 / compress

    def rate(t: float) -> float:
        h = t / day_s * 24  # hour of the (compressed) day
        diurnal = 0.5 - 0.5 * math.cos(2 * math.pi * (h - 3) / 24)  # trough at 03:00, peak at 15:00
        spikes = 4.0 * (_smooth_step(h, 10.0, 0.1) - _smooth_step(h, 10.5, 0.1)) + \
            5.0 * (_smooth_step(h, 19.0, 0.1) - _smooth_step(h, 19.4, 0.1))
        return scale * (2.5 + 15.5 * diurnal ** 1.5 + spikes)

    if compress == 1:
        return _build("text_day_24h", seed, day_s, rate, lambda t: 0.05,
                      "the same day at its real speed (24 h, not compressed): 2.5 req/s at night, 18 req/s at the "
                      "afternoon peak, two spikes of 30 and 24 min")
    return _build("text_day", seed, day_s, rate, lambda t: 0.05,
                  f"a day of mostly text traffic (5% with images) compressed {compress:g}x into {day_s / 3600:g} h: "
                  "2.5 req/s at night, 18 req/s at the afternoon peak, two short spikes")


def text_day_24h(seed: int = 2, scale: float = 1.0) -> Trace:
    return text_day(seed, scale, compress=1.0)


def shifting_mix(seed: int = 3, scale: float = 1.0) -> Trace:
    def share(t: float) -> float:
        return 0.1 + 0.7 * _smooth_step(t, 900, 600) - 0.7 * _smooth_step(t, 2400, 600)

    return _build("shifting_mix", seed, 3600, lambda t: scale * 10.0, share,
                  "60 min at 10 req/s whose image share moves 10% -> 80% (15-25 min) -> 10% (40-50 min)")


GENERATORS: dict[str, Callable[..., Trace]] = {"image_burst": image_burst, "text_day": text_day, "shifting_mix": shifting_mix,
                                               "text_day_24h": text_day_24h}


def generate(name: str, seed: int | None = None, scale: float = 1.0, duration_s: float | None = None) -> Trace:
    """The named trace; `duration_s` cuts it short (tests), `scale` multiplies its rate."""
    if name not in GENERATORS:
        raise ValueError(f"unknown trace {name!r}: choose one of {', '.join(GENERATORS)}")
    tr = GENERATORS[name](scale=scale) if seed is None else GENERATORS[name](seed=seed, scale=scale)
    if duration_s is not None:
        tr = Trace(tr.name, tr.seed, duration_s, [r for r in tr.requests if r.t < duration_s], tr.description)
    return tr


def save_csv(trace: Trace, path: Path) -> None:
    """One row per request: t, pixels of each image (';'-separated), prompt tokens, output tokens."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "image_pixels", "prompt_tokens", "output_tokens"])
        for r in trace.requests:
            w.writerow([f"{r.t:.3f}", ";".join(map(str, r.image_pixels)), r.prompt_tokens, r.output_tokens])

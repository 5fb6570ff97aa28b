"""Per-request sampling (temperature, top-k, top-p, seed) and stop-string handling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# A temperature below this samples greedily (as vLLM does): dividing the logits by it would overflow them
# to inf and leave no distribution to draw from.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 (below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits ([vocab])."""
    if params.greedy or generator is None:
        return int(torch.argmax(logits).item())
    scores = logits.float().cpu() / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop tokens once the mass *before* them already reaches top_p (the first token always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    """Index of the earliest stop string in text[start:], or -1."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to withhold from a stream because they may start a stop string (or
    are an incomplete UTF-8 sequence)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    tail = len(text) - len(text.rstrip("\ufffd"))
    return max(n, tail)

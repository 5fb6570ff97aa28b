"""Per-request sampling (temperature, top-k, top-p, seed) and stop-string handling."""

from __future__ import annotations

from array import array
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
    are an incomplete UTF-8 sequence): the longest end of `text` that is a proper beginning of a stop
    string, or the trailing U+FFFD run plus the longest end of the text before it that is one (the
    partial character may complete the stop string: "ab" + U+FFFD holds back 3 for the stop "abc").

    Linear in the text it looks at (the last `len(stop) - 1` characters, a KMP automaton over them): the
    old search tried every length and compared each, quadratic in a long stop string. The engine keeps
    a `StopTail` per request instead, which does the same work only for the characters a token adds."""
    return StopTail(stops).holdback(text)


def _borders(s: str) -> array:
    """KMP prefix function of s: entry i is the length of the longest proper prefix of s[:i + 1] that is
    also a suffix of it."""
    fail = array("i", [0]) * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopTail:
    """`holdback` for one request's growing text, paying only for the characters that changed.

    Per stop string it keeps the KMP state for each position of the last `len(stop) - 1` characters (the
    length of the longest end of text[:i] that is a beginning of the stop string). A new token's text
    usually extends the last one, so only the new characters are fed; when the detokenizer rewrote
    earlier characters (a U+FFFD that became a whole character, a space cleaned up) the states from the
    first changed character on are recomputed. The answer is exactly `holdback`'s. `steps` counts the
    characters fed to the automata (the work), so tests can bound it without timing anything."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._fail = [_borders(s) for s in self.stops]
        self._text = ""
        # _states[j][i - _bases[j]]: the state of stop j after text[:i].
        self._states = [array("i", [0]) for _ in self.stops]
        self._bases = [0] * len(self.stops)
        self.steps = 0

    def holdback(self, text: str) -> int:
        if not self.stops:
            # Most requests set no stop string: they hold back only a partial character (U+FFFD) at the end,
            # and pay nothing per token for the matching below (the comparison with the text before was a
            # pass over the whole answer at every token).
            return len(text) - len(text.rstrip("\ufffd"))
        keep = _common_prefix_len(self._text, text)
        self._text = text
        whole = len(text.rstrip("\ufffd"))  # the characters before a partial one (U+FFFD) at the end
        n = len(text) - whole
        for j, s in enumerate(self.stops):
            m, fail = len(s), self._fail[j]
            wstart = max(0, whole - (m - 1))  # the states from here on decide both answers below
            states, base = self._states[j], self._bases[j]
            if base <= min(keep, wstart) and keep < base + len(states):
                # The text up to `keep` is what the states were computed for: go on from there. (A state
                # begun before the window is still the window's answer: a KMP state is the longest end
                # that is a beginning of the stop string, whatever text came before.)
                del states[keep - base + 1:]
                start = keep
            else:  # changed before the kept states, or first seen: from the window's start, empty state
                states, base, start = array("i", [0]), wstart, wstart
            state = states[-1]
            for ch in text[start:]:
                self.steps += 1
                if state == m:
                    state = fail[m - 1]
                while state and s[state] != ch:
                    state = fail[state - 1]
                if s[state] == ch:
                    state += 1
                states.append(state)
            at_whole = states[whole - base]
            # The text's end may begin this stop string; and the partial character at the end may turn
            # into its next character, so the whole characters before it are held back with it when they
            # begin the stop string.
            n = max(n, fail[m - 1] if state == m else state,
                    len(text) - whole + (fail[m - 1] if at_whole == m else at_whole))
            if wstart > base:  # keep only the states a later, longer text's windows can use
                del states[:wstart - base]
                base = wstart
            self._states[j], self._bases[j] = states, base
        return n


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common beginning of a and b (string comparisons in C, slices summing to
    about len(a))."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[lo:mid], lo):
            lo = mid
        else:
            hi = mid - 1
    return lo

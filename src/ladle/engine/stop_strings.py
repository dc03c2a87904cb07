"""Stop strings matched across token boundaries, never emitted.

Text is held back while its tail could still be the start of a stop string ("<|" might
become "<|end|>"), and released as soon as it cannot. When a stop string appears, everything
from it on is dropped.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.held = ""  # text not yet safe to release
        self.stopped = False

    def push(self, text: str) -> str:
        """Add newly decoded text; return the part that can be emitted now."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        self.held += text
        cut = min((i for s in self.stop if (i := self.held.find(s)) != -1), default=-1)
        if cut != -1:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        keep = self._longest_partial_match()
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        """Release what was held back (generation ended without a stop string)."""
        out, self.held = self.held, ""
        return "" if self.stopped else out

    def _longest_partial_match(self) -> int:
        """Length of the longest suffix of `held` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.held)), best, -1):
                if self.held.endswith(s[:n]):
                    best = n
                    break
        return best

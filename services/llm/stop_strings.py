"""Cutting streamed text at stop strings, even when one spans several pushes.

The answer ends just before the stop string that *starts* earliest in the whole text. A push may complete
one stop while an earlier-starting one is still open (text "ba" with stops "baa" and "a": "a" is complete,
"baa" may still come), so a complete match is final only when no stop could still start before it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """`push` returns the text that is safe to emit: everything before the first stop string, minus any
    suffix that could still grow into one. After a match, `stopped` is true and later text is ignored."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stop_strings:
            return text
        buffer = self.held + text
        match = self._first_match(buffer)
        # The earliest place a stop string may still be starting: the longest tail that is a proper prefix of one.
        open_from = len(buffer) - self._open_tail_length(buffer)
        if match is not None and match <= open_from:
            return self._stop(buffer, match)
        self.held = buffer[open_from:]
        return buffer[:open_from]

    def flush(self) -> str:
        """The end of the text: a held-back complete match now wins, since nothing earlier can complete."""
        held, self.held = self.held, ""
        if self.stopped:
            return ""
        match = self._first_match(held)
        return held if match is None else self._stop(held, match)

    def _stop(self, buffer: str, match: int) -> str:
        self.stopped, self.held = True, ""
        return buffer[:match]

    def _first_match(self, buffer: str) -> int | None:
        starts = [i for i in (buffer.find(s) for s in self.stop_strings) if i >= 0]
        return min(starts, default=None)

    def _open_tail_length(self, buffer: str) -> int:
        for length in range(min(len(buffer), self.longest - 1), 0, -1):
            tail = buffer[-length:]
            if any(len(s) > length and s.startswith(tail) for s in self.stop_strings):
                return length
        return 0

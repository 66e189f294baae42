"""User-facing errors: one line naming the file, the key and what was expected.

Raise :class:`ScenarioError` for any infeasible or malformed input; the CLI prints ``str(error)``
and exits with status 2. ``assert`` is kept for internal invariants only.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ScenarioError(Exception):
    """Bad user input: ``FILE: KEY: MESSAGE`` on one line."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = _printable(file)
        self.key = _printable(key)
        self.message = " ".join(str(message).split())  # always one line
        super().__init__(self.__str__())

    def with_context(self, *, file: str | None = None, key: str | None = None) -> "ScenarioError":
        """The same error with a file or key filled in where it was still unknown."""
        return ScenarioError(self.message, file=self.file or file, key=self.key or key)

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        return ": ".join(parts + [self.message])


def _printable(text: str | None) -> str | None:
    """Escape control characters (a key may contain a newline) so the error stays on one line."""
    if text is None:
        return None
    text = str(text)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

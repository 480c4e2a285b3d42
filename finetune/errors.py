"""User-facing errors.

Everything the user can fix (a recipe typo, a missing file, a bad column) is raised as a
:class:`FinetuneError` whose message is one line naming the place and the fix. The CLI prints
that line and exits with status 2 instead of showing a traceback from deep inside a library.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FinetuneError(Exception):
    """An error caused by the user's input, reported as one line.

    Args:
        message: What is wrong and how to fix it.
        where: The file (and optionally field or line) the problem is in, e.g. ``"recipe.yaml: train.lr"``.

    Example (not run: it needs a model, data or a server)::
        raise FinetuneError("must be > 0, got -1", where="recipes/adapter.yaml: train.lr")
    """

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""

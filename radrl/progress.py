"""Progress bars for long work (bootstrap, eval sampling, ablation cells, bench settings), from tqdm.

They draw on stderr only when it is a terminal (tqdm's `disable=None`): logs, CI and piped output stay clean.
Training keeps its one line per iteration instead.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it"):
    """`iterable` wrapped in a progress bar (or a bar to `.update()` by hand when None)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def say(message: str) -> None:
    """Print a line without breaking a bar that is being drawn."""
    tqdm.write(message, file=sys.stdout)

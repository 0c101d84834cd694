"""Progress of long loops: a tqdm bar on a terminal, one plain line per step otherwise (a log
file or CI would otherwise show nothing for minutes)."""
from __future__ import annotations

import sys
from typing import Iterator

from tqdm import tqdm

from pipeline import data_parallel


class Progress:
    """Iterate `range(start, total)`; `report(**values)` after each step shows them."""

    def __init__(self, start: int, total: int, desc: str, unit: str, terminal: bool | None = None):
        self.desc, self.unit, self.total = desc, unit, total
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.silent = not data_parallel.is_main()  # rank 0 alone reports
        self.bar = tqdm(range(start, total), desc=desc, unit=unit, initial=start, total=total,
                        disable=self.silent or not self.terminal)
        self.done = start

    def __iter__(self) -> Iterator[int]:
        for i in self.bar:
            yield i
            self.done = i + 1

    def report(self, **values: str) -> None:
        if self.silent:
            return
        if self.terminal:
            self.bar.set_postfix(values)
        else:
            shown = " ".join(f"{k} {v}" for k, v in values.items())
            print(f"{self.desc}: {self.unit} {self.done + 1}/{self.total} {shown}", file=sys.stderr, flush=True)

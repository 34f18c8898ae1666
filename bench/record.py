"""Where the benchmarks keep their numbers: JSON lines appended to bench/results/NAME.

The drivers in experiments/ import this module too and pass their own results folder."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def append(name: str, rows: list[dict], folder: Path = RESULTS) -> None:
    folder.mkdir(exist_ok=True)
    with (folder / name).open("a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")

"""Where the benchmarks keep their numbers: JSON lines appended to bench/results/NAME."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def append(name: str, rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / name).open("a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")

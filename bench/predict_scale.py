"""Memory of a long screening stream: peak RSS after N files vs after a tenth of them.

    python bench/predict_scale.py --folder DIR [--files 10000] [--model transfer]

The folder's images are cycled (through links in a temporary folder) until there are
--files paths; they stream through `screening.predict` exactly as `pneumoscan predict` does.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from pneumoscan import DEFAULT_MODEL, runtime, screening


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    sources = screening.expand_paths([args.folder])
    model = runtime.load(args.model)  # the CPU default, as `pneumoscan predict` runs it
    with tempfile.TemporaryDirectory() as tmp:
        links = []
        for i in range(args.files):
            link = Path(tmp) / f"{i:06d}_{sources[i % len(sources)].name}"
            link.symlink_to(sources[i % len(sources)].resolve())
            links.append(link)
        marks = {}
        start = time.perf_counter()
        for i, result in enumerate(screening.predict(model, links), 1):
            assert result.error is None, result.error
            if i in (args.files // 10, args.files):
                marks[i] = round(peak_rss_mib(), 1)
        wall = time.perf_counter() - start
    first, last = marks[args.files // 10], marks[args.files]
    print(
        json.dumps(
            {
                "model": model.name,
                "files": args.files,
                "wall_s": round(wall, 1),
                "images_per_s": round(args.files / wall, 1),
                f"peak_rss_mib_after_{args.files // 10}": first,
                f"peak_rss_mib_after_{args.files}": last,
                "growth": round(last / first, 3),
            }
        )
    )


if __name__ == "__main__":
    main()

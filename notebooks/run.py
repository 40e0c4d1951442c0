"""Execute the notebooks in place, so that their saved outputs (figures, tables) are regenerated.

    python notebooks/run.py                    # every notebook in notebooks/
    python notebooks/run.py optimizers augment # some of them, by name

Needs the `notebooks` extra (`pip install -e ".[notebooks]"`). Each notebook runs top to bottom in
a fresh kernel, with notebooks/ as the working directory and inline figures; the run
stops at the first error (nothing is saved for that notebook). Prints the seconds each one took.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def execute(path: Path, timeout: int = 600) -> float:
    """Run one notebook in place; returns its wall time in seconds."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    # The kernel inherits this: figures go inline into the saved outputs (a global Agg backend, as
    # CI sets, would leave the notebook without its figures).
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in HERE.glob("*.ipynb"))
    for name in names:
        path = HERE / f"{Path(name).stem}.ipynb"
        if not path.exists():
            print(f"no notebook {path}", file=sys.stderr)
            return 2
        print(f"{path.name}: {execute(path):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the bench scripts share: ``replace_section`` rewrites one "## " section of bench/RESULTS.md
in place, ``median_seconds`` times a call.

The bench scripts import it as ``results_md`` (``python bench/bench_x.py`` puts ``bench/`` on the
import path).
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(section: str, path: Path = RESULTS) -> str:
    """Put ``section`` (its first line is its "## title") in ``path``, replacing the section of that
    title up to the next "## " heading, or appending it; returns ``section``."""
    title = section.splitlines()[0]
    if not title.startswith("## "):
        raise ValueError(f"a section starts with its '## ' title line, got {title!r}")
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text)
    return section


def median_seconds(function, steps, warmup=2):
    """Median wall seconds of ``function()`` over ``steps`` calls, after ``warmup`` untimed calls
    (tracing and the first allocations)."""
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)

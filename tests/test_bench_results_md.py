"""bench/results_md.py: one section of bench/RESULTS.md replaced in place, others untouched."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import results_md  # noqa: E402


def test_replace_section_in_place_and_append(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\nold a\n\n## B\n\nb stays\n")
    results_md.replace_section("## A\n\nnew a\n", path)
    assert path.read_text() == "# Benchmark results\n\n## A\n\nnew a\n\n## B\n\nb stays\n"
    results_md.replace_section("## B\n\nnew b", path)  # the last section, no trailing newline
    assert path.read_text() == "# Benchmark results\n\n## A\n\nnew a\n\n## B\n\nnew b\n"
    results_md.replace_section("## C\n\nc\n", path)
    assert path.read_text().endswith("## B\n\nnew b\n\n## C\n\nc\n")
    # "## A" must not match the start of "## AB".
    results_md.replace_section("## AB\n\nab\n", path)
    results_md.replace_section("## A\n\nnewer a\n", path)
    text = path.read_text()
    assert "newer a" in text and "ab" in text and "new a\n" not in text


def test_a_section_needs_its_title(tmp_path):
    with pytest.raises(ValueError, match="'## ' title"):
        results_md.replace_section("no title\n", tmp_path / "RESULTS.md")


def test_median_seconds_warms_up_then_times_each_call():
    calls = []
    seconds = results_md.median_seconds(lambda: calls.append(1), steps=3, warmup=2)
    assert len(calls) == 5 and 0.0 <= seconds < 0.1

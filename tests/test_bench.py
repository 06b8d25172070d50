"""bench.py: every subcommand runs end to end on CPU at tiny scale and prints its markdown table (no timings checked)."""
import subprocess
import sys

import pytest

from conftest import ROOT, needs_data


def bench(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.mark.parametrize("subcommand",
                         ["attention", "ct", "synthetic", "train", pytest.param("eval", marks=needs_data)])
def test_subcommand_tiny_prints_a_table(subcommand):
    result = bench(subcommand, "--tiny", *([]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|---|" in result.stdout, result.stdout[-2000:]


def test_help_and_unknown_subcommand():
    assert bench("--help").returncode == 0
    unknown = bench("nope")
    assert unknown.returncode == 1 and "usage: python bench.py" in unknown.stderr

"""config_flags.py: flags come from the dataclass; a flag not given keeps the default (or the base's value)."""
import argparse
from dataclasses import dataclass, replace

import pytest

from config_flags import add_config_flags, config_from_args, option


@dataclass
class Example:
    lr: float = option(2e-5, "peak learning rate")
    steps: int | None = option(None, "optimiser steps")
    method: str = option("cft", "what to train", choices=["cft", "cpt"])
    pack: bool = option(True, "pack documents")
    compile: bool = option(False, "torch.compile")
    seeds: list[int] = option([0, 1], "seeds")
    internal: int = 3  # no help: not a flag


def parse(argv, base=None):
    parser = add_config_flags(argparse.ArgumentParser(), Example)
    return config_from_args(Example, parser.parse_args(argv), base)


def test_defaults_live_in_the_dataclass_and_flags_override_them():
    assert parse([]) == Example()
    got = parse(["--lr", "1e-3", "--steps", "5", "--method", "cpt", "--no-pack", "--compile", "--seeds", "3", "4"])
    assert got == Example(lr=1e-3, steps=5, method="cpt", pack=False, compile=True, seeds=[3, 4])
    demo = replace(Example(), lr=5e-3, steps=150)
    assert parse(["--steps", "7"], base=demo) == replace(demo, steps=7)  # only given flags replace the base
    with pytest.raises(SystemExit):
        parse(["--method", "neg"])
    with pytest.raises(SystemExit):
        parse(["--internal", "4"])


def test_one_line_parser_turns_a_bad_flag_into_one_line(capsys):
    from config_flags import OneLineParser
    parser = add_config_flags(OneLineParser(), Example)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--method", "neg"])
    assert str(stop.value).startswith("error: argument --method: invalid choice") and "\n" not in str(stop.value)
    assert capsys.readouterr().err == ""

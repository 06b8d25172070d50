"""Command-line flags generated from a config dataclass, so that each default is written once: in the dataclass.

    @dataclass
    class TrainConfig:
        lr: float = option(2e-5, "peak learning rate")
        method: str = option("cft", "what to train", choices=["cft", "cpt"])

    parser = argparse.ArgumentParser(); add_config_flags(parser, TrainConfig)
    cfg = config_from_args(TrainConfig, parser.parse_args())

A field becomes --field-name; bool fields become --name / --no-name; `X | None` fields take an X. A flag that is not
given leaves the field at the dataclass default (or at the value of `base`, e.g. a demo's settings).
"""
import argparse
import dataclasses
import types
import typing


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line `error: ...` (argparse prints the usage too), exit status 1."""

    def error(self, message):
        raise SystemExit(f"error: {message} (see --help)")


def option(default, help: str, **argparse_kwargs):
    """A dataclass field with its command-line help (and choices, metavar, nargs... for argparse)."""
    factory = dataclasses.MISSING
    if isinstance(default, (list, dict)):
        factory, default = (lambda value=default: type(value)(value)), dataclasses.MISSING
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **argparse_kwargs})


def _value_type(annotation):
    """int for `int`, `int | None` and `Optional[int]`; the element type for `list[int]`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0]
    return annotation


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip=()) -> argparse.ArgumentParser:
    for f in dataclasses.fields(config_cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        kwargs = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs["help"] = kwargs["help"] + ("" if default is None else f" (default: {default})")
        name = "--" + f.name.replace("_", "-")
        if _value_type(f.type) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs.setdefault("type", _value_type(f.type))
            if typing.get_origin(f.type) is list:
                kwargs.setdefault("nargs", "+")
        parser.add_argument(name, dest=f.name, default=argparse.SUPPRESS, **kwargs)
    return parser


def config_from_args(config_cls, args: argparse.Namespace, base=None):
    """The config: `base` (default: the dataclass defaults) with every flag that was given on the command line."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return dataclasses.replace(base if base is not None else config_cls(), **given)

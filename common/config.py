"""Training-script options: one dataclass per script, a generated command line.

Every training script describes its options once, as a dataclass::

    @dataclass
    class Config:
        epochs: int = field(default=10, metadata={"help": "passes over the data"})
        fast: bool = field(default=False, metadata={"help": "tiny sizes for a smoke run"})
        FAST: ClassVar[dict] = {"epochs": 1}

    config = parse_config(Config)          # reads sys.argv
    save_config(config, config.out)        # out/config.json

``parse_config`` turns each field into ``--field-name`` (booleans become
``--flag`` / ``--no-flag``), shows every default in ``--help``, and applies
FAST mode: with ``--fast`` or the environment variable ``CVTF_FAST=1`` the
values in the class's ``FAST`` dict replace the defaults, except for options
the user typed. FAST mode changes sizes, never code paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

FAST_ENV = "CVTF_FAST"


def fast_mode() -> bool:
    """True when the environment asks for FAST mode (``CVTF_FAST=1``)."""
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _field_type(config_cls, field):
    hints = typing.get_type_hints(config_cls)
    kind = hints.get(field.name, str)
    origin = typing.get_origin(kind)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else str, True
    return kind, False


def _parse_tuple(text: str, item_type):
    items = [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
    return tuple(item_type(t.strip()) for t in items)


def _optional(kind, name):
    """A type for ``int | None`` options: the word None (any case) means None."""

    def convert(text):
        if text.strip().lower() == "none":
            return None
        return kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its error message
    return convert


def build_parser(config_cls, description: str | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one option per dataclass field."""
    if not dataclasses.is_dataclass(config_cls):
        raise ValueError(f"config_cls must be a dataclass, got {config_cls!r}")
    doc = (config_cls.__doc__ or "").strip()
    parser = argparse.ArgumentParser(
        description=description or (doc if not doc.startswith(config_cls.__name__ + "(") else None),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fast_values = getattr(config_cls, "FAST", {})
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if field.name in fast_values:
            help_text += f" [FAST mode: {fast_values[field.name]!r}]"
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        kind, optional = _field_type(config_cls, field)
        common = {"dest": field.name, "default": argparse.SUPPRESS}
        # argparse %-formats help strings: a literal "25% fg" must be written "25%% fg".
        help_with_default = f"{help_text} (default: {default!r})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                help=help_with_default, **common)
        elif typing.get_origin(kind) is tuple:
            item_type = (typing.get_args(kind) or (str,))[0]
            parser.add_argument(flag, type=lambda t, it=item_type: _parse_tuple(t, it),
                                metavar="A,B,...", help=help_with_default, **common)
        else:
            choices = field.metadata.get("choices")
            base = kind if kind in (int, float, str) else str
            parser.add_argument(flag, type=_optional(base, field.name) if optional else base,
                                choices=choices, help=help_with_default, **common)
    return parser


def parse_config(config_cls, argv: list[str] | None = None, description: str | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of ``config_cls``.

    Precedence: command line > FAST overrides (when FAST mode is on) > defaults.
    """
    parser = build_parser(config_cls, description)
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    config = config_cls()
    fast = given.get("fast", False) or fast_mode()
    if fast:
        for name, value in getattr(config_cls, "FAST", {}).items():
            if name not in given:
                setattr(config, name, value)
        if hasattr(config, "fast"):
            config.fast = True
    for name, value in given.items():
        setattr(config, name, value)
    return config


def config_to_dict(config) -> dict:
    """The dataclass as a JSON-friendly dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def save_config(config, out_dir, filename: str = "config.json") -> Path:
    """Write the resolved config as JSON into ``out_dir`` and return the path."""
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    return path


def write_metrics(metrics: dict, out_dir, filename: str = "metrics.json") -> Path:
    """Write the final metrics of a run (numbers only) as JSON and return the path."""
    clean = {}
    for key, value in metrics.items():
        if hasattr(value, "numpy"):
            value = value.numpy()
        if hasattr(value, "item"):
            value = value.item()
        clean[key] = value
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return path

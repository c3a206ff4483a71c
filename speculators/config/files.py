"""Settings files: `speculators <command> --config FILE`, for every command, one mechanism.

A settings file is a YAML (.yaml/.yml) or JSON mapping of a command's option names (the
field names, `draft_vocab_size`, or the flag's spelling `draft-vocab-size`) to values.
`parse_args` reads it as the command's defaults: the schema's defaults, then the file, then
the flags given on the command line. An unknown key or a bad value is a UserError naming the
file and the key; a command built from a settings model (`add_arguments`) checks the file's
values with that model, the others with their flags' types and choices.

The dashboard's worker hands each stage its settings as such a file (`write_settings_file`,
`speculators.config.stages.stage_launch`) instead of a long command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from speculators.errors import UserError

CONFIG_HELP = ("settings file (YAML .yaml/.yml or JSON): the options below as keys (field names, _ or -); "
               "flags given override it")


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The file's mapping, keys written with `_` (a UserError naming the file when it cannot be read)."""
    path = Path(path)
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # the parser's own message says where
        raise UserError(f"--config {path}: not valid {'YAML' if yaml_file else 'JSON'} ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def settings_of(cfg: BaseModel) -> dict[str, Any]:
    """What a settings file for `cfg`'s command holds: the fields its builder set (JSON types)."""
    from speculators.config.base import cli_fields

    return cfg.model_dump(mode="json", include=set(cli_fields(type(cfg))) & cfg.model_fields_set)


def write_settings_file(path: str | Path, cfg: BaseModel) -> Path:
    """Write `settings_of(cfg)` to `path` (JSON), for `speculators <command> --config PATH`."""
    from speculators.atomic import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings_of(cfg))
    return path


class _ProbeError(Exception):
    pass


class _ProbeParser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise _ProbeError(message)


class _Inert(argparse.Action):
    """In the probe, an option that acts when seen (--help, --version) does nothing."""

    def __call__(self, parser, namespace, values, option_string=None):
        pass


_STORING = (argparse._StoreAction, argparse._StoreConstAction, argparse._AppendAction,
            argparse._AppendConstAction, argparse._CountAction, argparse.BooleanOptionalAction,
            argparse._SubParsersAction)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Give `parser` the `--config FILE` option (once)."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=None, metavar="FILE", help=CONFIG_HELP)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` with the chosen command's `--config FILE` read as its defaults.

    `parser` is either one command's parser or a parser of subcommands (`speculators`), each
    with `add_config_option`. A command may name files read when no --config is given with
    `set_defaults(default_settings_files=(...))` (gen-and-train's ./gen_and_train.yaml).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    given = _given(parser, argv)
    if given is not None:
        command = _command_parser(parser, given)
        path = getattr(given, "config", None) or _default_file(given)
        if path is not None and command is not None:
            _apply(command, Path(path), given)
    return parser.parse_args(argv)


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | None:
    """The options given on the command line only (none of the defaults), or None when `argv`
    does not parse (the real parse then reports why)."""
    probe = copy.deepcopy(parser)
    for p in _parsers(probe):
        p.__class__ = _ProbeParser
        for action in p._actions:
            if not isinstance(action, _STORING):
                action.__class__ = _Inert
            if action.option_strings:
                action.default, action.required = argparse.SUPPRESS, False
    try:
        return probe.parse_known_args(argv)[0]
    except _ProbeError:
        return None


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += _parsers(sub)
    return out


def _command_parser(parser: argparse.ArgumentParser, given: argparse.Namespace) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(given, action.dest, None)
            return action.choices.get(name) if name is not None else None
    return parser


def _default_file(given: argparse.Namespace) -> Path | None:
    for name in getattr(given, "default_settings_files", ()) or ():
        if Path(name).is_file():
            print(f"settings from ./{name} (flags given override it)", file=sys.stderr, flush=True)
            return Path(name)
    return None


def _apply(command: argparse.ArgumentParser, path: Path, given: argparse.Namespace) -> None:
    """Check the file's settings against `command`'s options and make them its defaults
    (the flags in `given` keep their values)."""
    values = read_settings_file(path)
    options = {a.dest: a for a in command._actions if a.option_strings and a.dest not in ("help", "config")
               and a.default is not argparse.SUPPRESS}
    unknown = sorted(k for k in values if k not in options)
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)} (known: the options of "
                        f"`{command.prog} --help`, written with _ or -)")
    model = getattr(given, "settings_model", None)
    if model is not None:
        _, errors = model.errors_of(values)
        errors = {k: m for k, m in errors.items() if k in values}
        if errors:
            raise UserError(f"--config {path}: " + "; ".join(f"{k} {m}" for k, m in errors.items()))
    else:
        values = {k: _checked(options[k], v, f"--config {path}: {k}") for k, v in values.items()}
    chosen = {k: v for k, v in values.items() if not hasattr(given, k)}
    for k in chosen:
        options[k].required = False
    command.set_defaults(**chosen)


def _checked(action: argparse.Action, value: Any, where: str) -> Any:
    """`value` as the option `action` would have parsed it from the command line."""
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false (got {value!r})")
        return value
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_one(action, v, where) for v in items]
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type
    if isinstance(value, str) and kind not in (None, str):
        try:
            value = kind(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: {exc or 'invalid value'} (got {value!r})") from None
    elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where} must be a whole number (got {value!r})")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number (got {value!r})")
        value = float(value)
    elif kind in (None, str):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{where} must be text (got {value!r})")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: choose one of {', '.join(map(str, action.choices))} (got {value!r})")
    return value

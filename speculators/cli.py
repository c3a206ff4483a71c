"""The `speculators` command line.

Each subcommand lives in its own module under `speculators.commands`; a module
exposes `register(subparsers)` which adds its parser and sets `func`.  Heavy
imports (torch, transformers) happen inside the handlers so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from speculators.config.files import add_config_option, parse_args
from speculators.console import setup_logging
from speculators.errors import UserError

# Module names under speculators.commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "regenerate",
    "prepare_data",
    "build_vocab_mapping",
    "datagen",
    "convert_data",
    "convert",
    "train",
    "launch_vllm",
    "serve",
    "evaluate",
    "make_tiny_model",
    "gen_and_train",
    "demo",
)


def version_text() -> str:
    """Names this package unambiguously: the PyPI `speculators` (vllm-project) shares its name."""
    from pathlib import Path

    import speculators

    where = Path(speculators.__file__).resolve().parent
    return (
        f"speculators {speculators.__version__} ({PACKAGE_IDENTITY}) at {where}\n"
        "This is not vllm-project/speculators from PyPI; keep that one in a separate virtualenv."
    )


class _PrintVersion(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


# A marker only this project's package has (the public package has no speculators.cli.PACKAGE_IDENTITY).
PACKAGE_IDENTITY = "EAGLE-3 trainer + dashboard project"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speculators",
        description="Train EAGLE-3 draft models (speculators) and serve them in vLLM.",
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level")
    parser.add_argument("--version", action=_PrintVersion, nargs=0,
                        help="which speculators package this is (this project, not the PyPI one), and where")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"speculators.commands.{name}").register(sub)
    for command in sub.choices.values():
        add_config_option(command)  # every command reads a settings file the same way
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a bare `--` is passed through untouched (vLLM args).
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    try:
        args = parse_args(build_parser(), argv)
        args.passthrough = passthrough
        setup_logging(str(args.log_level))
        rc = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

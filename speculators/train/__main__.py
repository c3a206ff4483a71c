"""`python -m speculators.train ...` and `torchrun --nproc_per_node N -m speculators.train ...`."""

import argparse
import sys

from speculators.config.files import add_config_option, parse_args
from speculators.console import setup_logging
from speculators.errors import UserError
from speculators.train.cli import add_train_arguments, run_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speculators.train", description="Train an EAGLE-3 draft model.")
    add_train_arguments(parser)
    add_config_option(parser)
    try:
        args = parse_args(parser, argv)
        setup_logging("INFO")
        return run_from_args(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

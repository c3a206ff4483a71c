"""Errors shared by every stage."""


class UserError(Exception):
    """Bad input from the user: printed as `error: ...` without a traceback, exit 2.

    The message must name the field or file at fault and say what to do.
    """

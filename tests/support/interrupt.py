"""A stand-in for a process killed mid-run, shared by the resume tests."""


class Killed(BaseException):
    """Raised inside a run the way SIGKILL ends it: a BaseException of the test's own, so no
    handler in the code under test catches it and nothing past the raise runs."""

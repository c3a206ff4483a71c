"""Test-only helpers (tiny data writers, stand-in servers, worker processes, subprocess probes).

Imported as `tests.support.*` by the tests and a few bench scripts; no product module imports them.
"""

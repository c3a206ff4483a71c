"""The errors the run store raises for a change it refuses; their messages are for the user."""

from __future__ import annotations


class StoreError(Exception):
    """A change the store refuses (e.g. deleting a running run)."""


class NameTaken(StoreError):
    """A new run's name is already another run's."""


class StoreUnreachable(StoreError):
    """The database behind SPEC_DB_URL does not answer (the message names the URL)."""

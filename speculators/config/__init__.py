"""Typed settings: the one place a setting's default, help, bounds and flag are written."""

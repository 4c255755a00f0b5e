"""Errors shared by every part of groundlabel."""


class UserError(Exception):
    """An error caused by the user's input or environment; reported with its reason, no traceback."""

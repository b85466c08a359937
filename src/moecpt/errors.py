"""Errors meant for the user.

A `UserError` says what is wrong with an input (naming the file, line or key) and what to do about it. The CLI
prints its message alone, without a traceback, and exits with status 2.
"""


class UserError(Exception):
    """Bad input or configuration, explained for the user."""

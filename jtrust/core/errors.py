"""The one error type for bad input.

Every reader, loader and option check raises `InputError` when what it was given is wrong: the
message names the file (and line or key) or the flag, says what was expected and what to do.
The command line prints it as one line and exits with status 2; anything else that escapes is
a bug in jtrust. It is a ValueError (and `MissingInput` also a FileNotFoundError), so code that
caught those before still does.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: a wrong path, a corrupt or mismatched file, an invalid option value."""


class MissingInput(InputError, FileNotFoundError):
    """A path the user gave does not exist."""


class OutputExists(InputError, FileExistsError):
    """An output path the user gave exists and would be overwritten."""

"""The one error type for bad user input.

A `UserError` is a `ValueError` whose message says what was wrong and how to fix it; the CLI prints it as one
line (no traceback) and exits with status 2. Library code raises it; nothing catches it below the CLI.
"""


class UserError(ValueError):
    pass

"""The one exception type that reaches the user as a single line (see `dgpt.cli.main`)."""


class DgptError(Exception):
    """Bad input or an impossible request: the message names the file, oracle or key and what is wrong."""

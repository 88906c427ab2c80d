"""User errors: bad config, bad data, missing files. The CLI prints one line and exits with code 2."""


class UserError(Exception):
    """An error in what the user gave us (not a bug); its message is one line naming the key, file or line."""


class DataError(UserError):
    """Bad input data: the message names the file (and line, where there is one)."""


class RunFailed(Exception):
    """A run that stopped itself on purpose (e.g. diverged): one line, exit code 3, checkpoints kept."""

    exit_code = 3

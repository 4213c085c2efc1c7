"""Errors that name the option a user set, so the CLI can name its flag instead of the Python argument."""

import re


class OptionError(ValueError):
    """A bad value of one option. The message names it as the Python argument (`column=FIELD`, `kl_ctl`);
    `for_flag("--column")` gives the same message with the command-line flag in its place."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option

    def for_flag(self, flag: str) -> str:
        # "column=FIELD" reads "--column FIELD" on the command line; a bare "kl_ctl" reads "--kl-ctl".
        pattern = rf"(?<![\w-]){re.escape(self.option)}(?![\w-])(=?)"
        return re.sub(pattern, lambda m: flag + (" " if m[1] else ""), str(self))

"""User-facing errors, and every exit status of the `lowvram` command, defined once here.

status  name               when
0       EXIT_OK            the command did what was asked
1       EXIT_CHECK_FAILED  a check the user ran found problems: `data check` errors (or warnings with
                           --strict), export verification FAIL (or warn with --strict). An uncaught bug
                           also ends with 1 (Python's own status, with its traceback)
2       EXIT_USER_ERROR    a mistake the user can fix, in one message without a traceback (UserError):
                           a bad recipe or override, a missing or unreadable file, training data that
                           cannot be read (DataFileError, lowvram.data.sources), a card too small
3       EXIT_OUT_OF_MEMORY the card ran out of memory; the message names the setting to lower (OutOfMemory)
130     EXIT_INTERRUPTED   Ctrl-C (Interrupted, or a KeyboardInterrupt outside training), as a shell reports
                           a SIGINT: 128 + 2
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, card too small).

    The CLI prints `message` (and each line of `problems`) and exits with `exit_code`.
    Bugs must not be wrapped in this: they should still raise with a traceback.
    """

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None):
        self.message = message
        self.problems = list(problems or [])
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.message]
        lines += [f"  - {p}" for p in self.problems]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class OutOfMemory(UserError):
    """The card ran out of memory; the message names the setting to lower."""

    exit_code = EXIT_OUT_OF_MEMORY


class Interrupted(UserError):
    """Ctrl-C during training: the stage stopped (with a checkpoint where one could be saved)."""

    exit_code = EXIT_INTERRUPTED

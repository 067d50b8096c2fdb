"""User-facing errors: one clear message, exit status 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, card too small).

    The CLI prints `message` (and each line of `problems`) and exits with `exit_code`.
    Bugs must not be wrapped in this: they should still raise with a traceback.
    """

    exit_code = 2

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

    exit_code = 3

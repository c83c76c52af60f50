"""The one exception type for user mistakes: the CLI prints its message and exits with 2."""

import re


class LayerProbeError(Exception):
    """Bad input or an impossible request, with a message that says what to do.

    The message is always one line: a multi-line reason quoted from another library
    (tarfile, torch, PIL) is joined into it, so the CLI's error stays a single line.
    """

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message).strip()))


def first_line(e: BaseException) -> str:
    """The first line of another library's exception (at most 200 characters), to quote in a one-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

"""The one exception type for user mistakes: the CLI prints its message and exits with 2."""


class LayerProbeError(Exception):
    """Bad input or an impossible request, with a message that says what to do."""

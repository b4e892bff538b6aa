"""The one exception type users see: a message naming the culprit and the fix."""


class GalaxyTuneError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line."""

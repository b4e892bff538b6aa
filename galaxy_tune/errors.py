"""The exceptions users see: a message naming the culprit and the fix."""

STOPPED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped early by a signal; the same command again continues


class GalaxyTuneError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line (exit code 2)."""


class Stopped(GalaxyTuneError):
    """A search or retrain stopped early by Ctrl-C, SIGTERM or SIGUSR1, its finished work kept on disk; the
    message says how to continue (exit code STOPPED_EXIT_CODE)."""

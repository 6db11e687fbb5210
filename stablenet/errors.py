"""Exception types shared across parts. Library code raises these; the CLI turns them into one
line on stderr and an exit code."""


class StartupError(Exception):
    """A listener or resource could not be set up. str() is one line naming the setting."""

"""The base class of every error a user can cause and fix; the CLI prints its one-line message."""


class UserError(ValueError):
    """A mistake in configuration, data, model choice or strategy; the message says the fix."""

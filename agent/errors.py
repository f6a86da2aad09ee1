"""The root of the agent's exceptions.

Every error the agent raises on purpose derives from :class:`CardAgentError`; its message is
written for the person who has to act on it (what happened, then what to do) and never holds a
PIN or key material.
"""


class CardAgentError(Exception):
    """An error with a message meant for the user or administrator."""


class ConfigError(CardAgentError):
    """A setting is missing or malformed."""

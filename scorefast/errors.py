"""Exceptions of scorefast."""


class NonFiniteError(ValueError):
    """A network output or state became NaN/inf; the message names the step and time."""

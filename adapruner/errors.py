"""Errors a user can act on. The CLI prints their message in one line and exits with 2."""


class AdaPrunerError(Exception):
    """Base class: bad input or a missing resource, never a bug."""


class FetchError(AdaPrunerError):
    """A built-in asset could not be fetched from its package registry."""


class UnsupportedModelError(AdaPrunerError):
    """The model's architecture has no prunable layout we know."""

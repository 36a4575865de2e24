"""Errors a user can act on (the CLI prints their message in one line and exits with 2), and the way
a caller stops long work: an ``on_step(phase, done, total)`` callback that raises :class:`Stopped`."""

from collections.abc import Callable

OnStep = Callable[[str, int, int], None]


class AdaPrunerError(Exception):
    """Base class: bad input or a missing resource, never a bug."""


class FetchError(AdaPrunerError):
    """A built-in asset could not be fetched from its package registry."""


class UnsupportedModelError(AdaPrunerError):
    """The model's architecture has no prunable layout we know."""


class Stopped(Exception):  # noqa: N818  (not an error: the caller asked to stop)
    """Raised by an ``on_step`` callback to stop long work (a model load, the statistics pass) between
    steps: the service's workers raise it when their job is cancelled."""

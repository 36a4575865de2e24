"""Out-of-domain test sources: text that neither calibrates a pruning nor validates a search.

A search tuned on one kind of text can look better on that text than it is. Every search therefore
also reports test perplexity on held-out sources. By default these are the built-in sources that the
job does not calibrate or validate on, whenever the job uses a built-in source at all; a job on its
own texts names its held-out sources, so that nothing is fetched behind its back.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import AdaPrunerError
from .builtin import BUILTIN_SOURCES
from .windows import parse_draw

BUILTIN_PREFIX = "builtin:"


def default_heldout(used: Sequence[str]) -> tuple[str, ...]:
    """The built-in sources not among ``used`` (source specs, counts allowed), if any of ``used`` is built in."""
    names = {parse_draw(spec, 0)[0].strip() for spec in used}
    if not any(name.startswith(BUILTIN_PREFIX) for name in names):
        return ()
    return tuple(spec for spec in (BUILTIN_PREFIX + name for name in BUILTIN_SOURCES) if spec not in names)


def check_heldout(used: Sequence[str], heldout: Sequence[str] | None) -> tuple[str, ...]:
    """``heldout`` (``None``: the default), refused where it overlaps the calibration or validation text."""
    if heldout is None:
        return default_heldout(used)
    names = {parse_draw(spec, 0)[0].strip() for spec in used}
    for spec in heldout:
        if spec.strip() in names:
            raise AdaPrunerError(f"held-out source {spec!r} also calibrates or validates: a held-out test "
                                 "must be text the search never saw")
    return tuple(dict.fromkeys(spec.strip() for spec in heldout))

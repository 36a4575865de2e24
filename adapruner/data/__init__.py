"""Text for calibration and evaluation: built-in corpora, Hugging Face datasets and local files.

Every source is cut into ``pool``, ``validation`` and ``test`` parts by document, or by work where its
documents belong to larger works (the novels of ``builtin:books``; see :mod:`.sources`); token
windows over those parts are built in :mod:`.windows`; :mod:`.heldout` names the sources a search
tests on but never sees.
"""

from .builtin import BUILTIN_SOURCES, BUILTIN_TEXTS, DEFAULT_CALIBRATION, FAR_SOURCES
from .heldout import check_heldout, default_heldout
from .sources import SPLITS, TextSource, load_source, load_sources, split_documents, split_works
from .windows import (
    DEFAULT_SEQ_LEN,
    CalibrationPool,
    build_pool,
    eval_windows,
    parse_draw,
    pool_draws,
    sample_windows,
    tokenize_windows,
    training_windows,
)

__all__ = [
    "DEFAULT_CALIBRATION", "DEFAULT_SEQ_LEN",
    "BUILTIN_SOURCES", "BUILTIN_TEXTS", "FAR_SOURCES", "SPLITS", "CalibrationPool", "TextSource", "build_pool",
    "check_heldout", "default_heldout",
    "eval_windows", "load_source", "load_sources", "parse_draw", "pool_draws", "sample_windows", "split_documents",
    "split_works",
    "tokenize_windows", "training_windows",
]

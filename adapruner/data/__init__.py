"""Text for calibration and evaluation: built-in corpora, Hugging Face datasets and local files.

Every source is cut into ``pool``, ``validation`` and ``test`` parts by document (see
:mod:`.sources`); token windows over those parts are built in :mod:`.windows`.
"""

from .builtin import BUILTIN_SOURCES
from .sources import SPLITS, TextSource, load_source, load_sources, split_documents
from .windows import CalibrationPool, build_pool, eval_windows, parse_draw, tokenize_windows, training_windows

__all__ = [
    "BUILTIN_SOURCES", "SPLITS", "CalibrationPool", "TextSource", "build_pool", "eval_windows", "load_source",
    "load_sources", "parse_draw", "split_documents", "tokenize_windows", "training_windows",
]

"""Keeping a running engine's long-lived objects out of the garbage collector's full passes.

After start a process holds a few hundred thousand long-lived objects (the model's modules, the
tokenizer, torch and Ray internals); each full collection walks all of them, a 50-75 ms pause on
the engine thread whenever allocation-heavy work (a guided request's grammar states, a burst of
new requests) triggers one. `freeze` moves them out of the collector's reach (`gc.freeze`): a
full collection then walks only what was made since. Frozen objects are never collected while
frozen, so an engine's shutdown calls `unfreeze`.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze() -> None:
    """Collect, then freeze every object alive now (called once the workers run, again after a
    worker group is replaced and after the guided-output vocabulary is built)."""
    gc.collect()
    gc.freeze()
    logger.debug("froze %d objects out of the garbage collector's reach", gc.get_freeze_count())


def unfreeze() -> None:
    """Make every frozen object collectable again (an engine shut down)."""
    gc.unfreeze()

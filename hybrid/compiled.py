"""The stages' ``compile`` switches share one rule: a compiled call that fails (no C++ compiler, an
unsupported GPU) is run again on the eager modules, and the stage stays eager, with a warning."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def eager_on_failure(call: Callable[[], T], compiled: bool, uncompile: Callable[[], None], switch: str,
                     instead: str) -> T:
    """``call()``; when it raises and ``compiled``, warn (naming ``switch``), ``uncompile()`` and
    ``call()`` again, so an error that is not the compiler's is raised by the eager call."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 (any compiler failure: the eager call raises a real error again)
        if not compiled:
            raise
        log.warning("%s: torch.compile failed (%s: %s); %s instead", switch, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "", instead)
        uncompile()
        return call()

"""The one clock of scheduled work: ``$VAULTFS_NOW`` when set, else the system time.

``VAULTFS_NOW`` is a unix time (``1796515200``) or an ISO 8601 date-time (``2026-12-06T09:00``,
local time unless it names a zone). Tests and drills set it to simulate days passing: tiers'
due times, snapshot times and retention all read it, so one process sees one fixed instant.
Never set it on a production vault: snapshots would carry the pretended time.
"""

from __future__ import annotations

import os
import time
from datetime import datetime

from .errors import InputError

ENV = "VAULTFS_NOW"


def now() -> float:
    """Seconds since the epoch: ``$VAULTFS_NOW`` if set (InputError if malformed), else
    ``time.time()``."""
    text = os.environ.get(ENV)
    if not text:
        return time.time()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise InputError(
            f"{ENV}={text!r} is neither a unix time nor an ISO 8601 date-time"
        ) from None

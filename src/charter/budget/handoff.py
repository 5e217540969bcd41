"""A reservation made on a worker thread for a caller on the event loop who may be gone by then.

A remote ledger (PostgreSQL) is asked from a thread (`LedgerThreads`), and the thread cannot be
stopped: a caller cancelled while it waits (a client that hung up, a daemon shutting down) still
gets its reservation made, once the row locks allow. Whoever comes second, the thread finishing or
the caller leaving, gives that reservation back, exactly once, so that it is neither left held
until its expiry books it in full nor released twice. This holds even when the loop itself is
closing and will run no more callbacks: the thread then releases on its own, within the same
counted call, so closing the ledger waits for the release too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from charter.budget.ledger import Reservation
from charter.errors import CONFLICT, CharterError

log = logging.getLogger("charter.budget")


class ReservationHandoff:
    def __init__(self, release: Callable[[str], None], release_later: Callable[[str], None]) -> None:
        """`release` gives a reservation back, blocking; `release_later` has a ledger thread do it."""
        self._release, self._release_later = release, release_later
        self._lock = threading.Lock()
        self._abandoned = False
        self._made: Reservation | None = None

    def run(self, reserve: Callable[..., Reservation | None], *args: Any) -> Reservation | None:
        """On the worker thread: make the reservation, and hand it over unless the caller left."""
        res = reserve(*args)
        with self._lock:
            if not self._abandoned:
                self._made = res
                return res
        if res is not None:
            release_quietly(self._release, res.id)
        return None

    def abandon(self) -> None:
        """On the loop, the caller cancelled: give back what was made, or have the thread do it."""
        with self._lock:
            self._abandoned = True
            res, self._made = self._made, None
        if res is not None:
            self._release_later(res.id)


def release_quietly(release: Callable[[str], None], reservation_id: str) -> None:
    """Give a reservation back from a thread no one waits on: a failure is logged, never lost."""
    try:
        release(reservation_id)
    except CharterError as exc:
        if exc.code != CONFLICT:
            warn_unreleased(reservation_id, exc)
        else:  # settled or released already (a race with the settlement, or a second give-back): nothing held
            log.debug("reservation %s needed no release: %s", reservation_id, exc.message)
    except Exception as exc:  # noqa: BLE001 - nobody to raise to; the expiry books it, in full
        warn_unreleased(reservation_id, exc)


def warn_unreleased(reservation_id: str, exc: BaseException) -> None:
    log.warning("could not release reservation %s (%s); it stays held until its expiry",
                reservation_id, exc, extra={"fields": {"reservation_id": reservation_id}})

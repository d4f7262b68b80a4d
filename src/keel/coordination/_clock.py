"""The clocks a lease's expiry bound is measured on (pure functions of the system clocks).

``time.monotonic`` (CLOCK_MONOTONIC) stops while a host is suspended, so a holder whose host
slept past its lease would resume believing it had time left while every other process saw
the lease over. The bound is therefore kept on two clocks at once, and a lease counts as run
out as soon as *either* says so:

* `now`: CLOCK_BOOTTIME on Linux, which keeps counting through a suspend (elsewhere,
  CLOCK_MONOTONIC);
* the wall clock (``time.time``), which a hypervisor cannot hide a pause from once the guest's
  clock is corrected after it (NTP, or qemu-guest-agent's ``guest-set-time`` as libvirt and
  ``virsh domtime --sync`` do after a resume or a migration).

Stepping the wall clock forward only ends leases early (safe: the fence refuses the old
holder anyway); stepping it back is covered by the boot clock.
"""

from __future__ import annotations

import functools
import time

_BOOT = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)

# Seconds on the boot clock (does not stop while the host is suspended). A partial, not a
# function: it is read several times per acquire and release, and a Python frame per read
# was a third of its cost.
now = functools.partial(time.clock_gettime, _BOOT)


class Bound:
    """An expiry instant held on both clocks: ``passed()`` once either reaches it."""

    __slots__ = ("boot", "wall")

    def __init__(
        self, expires: float, wall: float | None = None, boot: float | None = None
    ) -> None:
        """``wall`` and ``boot``: the clocks as just read (the wall clock first, so the wall
        bound errs early), to spare reading them again; both or neither."""
        self.boot = expires
        if wall is None or boot is None:
            wall = time.time()
            boot = now()
        self.wall = wall + (expires - boot)

    def passed(self) -> bool:
        return now() >= self.boot or time.time() >= self.wall

    def remaining(self) -> float:
        """Seconds left by the stricter of the two clocks (negative once passed)."""
        return min(self.boot - now(), self.wall - time.time())

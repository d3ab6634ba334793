"""AdmissionLimit: how many sagas the coordinator lets be in flight at once.

Without a limit an overloaded cluster accepts every Submit and each saga's latency
grows with the queue in front of it (at 300/s offered, 4-10 s within ten seconds,
without bound after that). A fixed limit is wrong both ways: too low for slow
participants (sagas that take seconds each legitimately), too high for a
saturated CPU. So the limit follows the latency sagas actually see, AIMD-style
as in TCP congestion control and Netflix's concurrency-limits:

* every UPDATE_S, the median latency (StartSaga to EndSaga) of the sagas that
  ended in that period is compared with the allowed latency: the larger of
  LATENCY_FLOOR_S and TOLERANCE x the best period median of the last WINDOW_S
  (the no-queue latency, which follows participants that are slow for good; a
  median, not the fastest saga, so that a few trivial sagas among slow ones do
  not pin the limit at its minimum);
* above it: the limit is cut (x DECREASE); well below it (half): it grows fast
  (x INCREASE); in between: slowly (+ sqrt); never beyond twice the sagas that
  were in flight in the period (an idle cluster does not bank a huge limit),
  never below MIN_LIMIT nor above MAX_LIMIT;
* a period in which (almost) no saga ended while in-flight sagas filled the
  limit: they are waiting on participants (a hung or paused one), not on the
  coordinator, so there is no evidence of overload: the limit grows (x INCREASE).
  Without this, 100 sagas waiting on one stopped participant would refuse every
  other Submit.

Pure: the caller supplies times and counts. Not thread-safe for writers (the
driver's thread); `limit` is read from gRPC threads (an int: a stale read is fine).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

UPDATE_S = 0.5
WINDOW_S = 60.0
LATENCY_FLOOR_S = 0.25  # below this no saga is throttled (the p99 target at load)
TOLERANCE = 2.0
# Low: at this machine's peak (~65 travel sagas/s, 2 cores) a limit of 100 held
# 1.5 s of queue in front of every saga. The limit grows fast wherever the latency
# allows more, and when full sagas wait on participants rather than on us.
MIN_LIMIT = 8
MAX_LIMIT = 20_000  # memory: also the Sagas service's hard cap
MIN_SAMPLES = 5  # fewer ended sagas in a period: too few to judge, no change
DECREASE = 0.7
INCREASE = 1.5


class AdmissionLimit:
    def __init__(self, now: float, initial: int = MIN_LIMIT) -> None:
        self.limit = max(MIN_LIMIT, min(MAX_LIMIT, initial))
        self._period_start = now
        self._samples: list[float] = []
        self._peak_in_flight = 0
        self._ended = 0  # sagas that ended this period, with or without a sample
        # (period start, median latency of that period), oldest first
        self._best: deque[tuple[float, float]] = deque()

    def allowed_latency_s(self) -> float:
        if not self._best:
            return LATENCY_FLOOR_S
        return max(LATENCY_FLOOR_S, TOLERANCE * min(best for _, best in self._best))

    def on_ended(self, latency_s: float | None) -> None:
        """A saga ended; its latency when known (None: it started before this
        coordinator took office, so its latency holds the failover)."""
        self._ended += 1
        if latency_s is not None:
            self._samples.append(max(0.0, latency_s))

    def update(self, now: float, in_flight: int) -> None:
        """Call often (each driver turn); acts once per UPDATE_S."""
        self._peak_in_flight = max(self._peak_in_flight, in_flight)
        if now - self._period_start < UPDATE_S:
            return
        samples, peak, ended = self._samples, self._peak_in_flight, self._ended
        self._period_start, self._samples, self._peak_in_flight = now, [], in_flight
        self._ended = 0
        if ended < MIN_SAMPLES and peak >= self.limit * 0.9:
            # Full, and (almost) nothing ends: sagas wait on participants, not on us.
            self.limit = min(MAX_LIMIT, int(self.limit * INCREASE) + 1)
            return
        if len(samples) < MIN_SAMPLES:
            return
        median = statistics.median(samples)
        allowed = self.allowed_latency_s()  # judged against the window before this period
        self._best.append((now, median))
        while self._best and self._best[0][0] < now - WINDOW_S:
            self._best.popleft()
        limit = self.limit
        if median > allowed:
            limit = int(limit * DECREASE)
        elif median < allowed / 2:
            limit = min(int(limit * INCREASE) + 1, 2 * peak)
        else:
            limit = min(limit + int(math.sqrt(limit)), 2 * peak)
        self.limit = max(MIN_LIMIT, min(MAX_LIMIT, limit))

"""In-process fan-out of adaptation signals and state updates to live consumers.

The policy engine publishes each new :class:`AdaptationSignal` here once; the gRPC stream, the
dashboard's server-sent events, webhooks and xAPI each ``subscribe()`` and get their own bounded
queue, so a slow consumer can never block ingest (its oldest items are dropped, counted and
logged: a page or stream that falls this far behind shows stale data, which an admin should know).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from google.protobuf.message import Message

from coordinator.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


@dataclass
class Subscription:
    queue: queue.Queue
    dropped: int = 0


@dataclass
class Hub:
    maxsize: int = 1000
    _subs: list[Subscription] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slow: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(60.0, log))

    def subscribe(self) -> Subscription:
        sub = Subscription(queue.Queue(self.maxsize))
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, item: Message) -> None:
        """Deliver ``item`` (an AdaptationSignal or ClassroomState) to every subscriber."""
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            while True:
                try:
                    sub.queue.put_nowait(item)
                    break
                except queue.Full:
                    try:
                        sub.queue.get_nowait()
                        sub.dropped += 1
                        self._slow.warning("dropped", "a live consumer (dashboard page, gRPC stream or outlet) "
                                           "is %d items behind and has lost %d so far; is it stuck?",
                                           self.maxsize, sub.dropped)
                    except queue.Empty:
                        pass

"""In-process fan-out of adaptation signals and state updates to live consumers.

The policy engine publishes each new :class:`AdaptationSignal` here once; the gRPC stream, the
dashboard's server-sent events, webhooks and xAPI each ``subscribe()`` and get their own bounded
queue, so a slow consumer can never block ingest (its oldest items are dropped and counted).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from google.protobuf.message import Message


@dataclass
class Subscription:
    queue: queue.Queue
    dropped: int = 0


@dataclass
class Hub:
    maxsize: int = 1000
    _subs: list[Subscription] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

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
                    except queue.Empty:
                        pass

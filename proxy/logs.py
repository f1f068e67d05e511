"""Process logging for ``credproxy run``: log lines never block the event loop.

A refusal writes one log line; if stderr is a pipe whose reader stalls (``2>&1 | tee``, a
log shipper that stopped), a plain ``StreamHandler`` blocks the event loop on the next
line, and with it every request and both probes. Here records go through a bounded queue
to a writer thread (the standard library's ``QueueHandler``/``QueueListener``); when the
queue is full, lines are dropped and counted, and the count is logged once the writer
catches up. The audit trail never goes through this path (see :mod:`proxy.audit`).
"""

from __future__ import annotations

import logging
import queue
from logging.handlers import QueueHandler, QueueListener
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CAPACITY = 10_000  # log records waiting for the writer thread


class _BoundedQueueHandler(QueueHandler):
    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                note = logging.LogRecord("credproxy", logging.WARNING, __file__, 0,
                                         "%d log lines were dropped: stderr was not being "
                                         "read", (self.dropped,), None)
                self.queue.put_nowait(self.prepare(note))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def configure(stream: TextIO, level: int = logging.INFO) -> QueueListener:
    """Route the root logger through a bounded queue to ``stream``; returns the started
    listener (stop it to flush)."""
    q: queue.Queue[logging.LogRecord] = queue.Queue(CAPACITY)
    writer = logging.StreamHandler(stream)
    writer.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_BoundedQueueHandler(q))
    root.setLevel(level)
    listener = QueueListener(q, writer)
    listener.start()
    return listener

"""Predictions written to the store on a background thread, in batches: the answer never waits for the database."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from fovea.store import PredictionRecord, Store

log = logging.getLogger("fovea.serve")


class PredictionLog:
    """``log.put(dict)`` returns at once; a thread inserts the rows, up to ``batch`` per transaction.

    If the database is down the rows are dropped with a warning (counted in ``dropped``), never the answer.
    A full queue (the database far slower than the traffic) also drops, rather than growing without bound.
    """

    def __init__(self, store: Store, batch: int = 256, max_queue: int = 100_000) -> None:
        self.store, self.batch = store, batch
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(max_queue)
        self.written = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="fovea-prediction-log", daemon=True)
        self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self.queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        done = False
        while not done:
            rows: list[dict[str, Any]] = []
            item = self.queue.get()
            while True:
                if item is None:
                    done = True
                    break
                rows.append(item)
                if len(rows) >= self.batch:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            if rows:
                try:
                    with self.store.session() as s:
                        s.add_all([PredictionRecord(**r) for r in rows])
                    self.written += len(rows)
                except Exception as e:  # noqa: BLE001 - a database outage must not stop serving
                    self.dropped += len(rows)
                    log.warning("could not log %d predictions: %s", len(rows), str(e).splitlines()[0])

"""A reader that runs beside a writer in tests: it must always find a valid file."""

from __future__ import annotations

import threading
import time


class Reader:
    """Calls ``read`` over and over in a thread until finished; keeps every value and every failure."""

    def __init__(self, read, pause: float = 0.0):
        self.read, self.pause, self.values, self.failures = read, pause, [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop.is_set():
            try:
                self.values.append(self.read())
            except Exception as error:  # noqa: BLE001 - any failure of a reader is the finding
                self.failures.append(repr(error))
            time.sleep(self.pause)

    def finish(self):
        self.stop.set()
        self.thread.join()
        return self

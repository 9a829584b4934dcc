"""Stop requests: SIGUSR1/SIGTERM (SLURM's warning signal, preemption) or a `STOP` file in the run dir.

A handler only sets a flag; the train loop checks it at the next step boundary, where all ranks agree
on it through the per-step all-reduce, checkpoint, and exit cleanly.
"""

from __future__ import annotations

import signal
from pathlib import Path


class StopRequest:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, run_dir: Path):
        self.stop_file = Path(run_dir) / "STOP"
        self.signal_name: str | None = None
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a sweep worker thread): rely on the STOP file
                pass

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.signal_name is None and self.stop_file.exists():
            self.signal_name = "STOP file"
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.stop_file.unlink(missing_ok=True)

"""SIGINT / SIGTERM as a request to stop: the loop saves a checkpoint at the next step
boundary and the run exits with 128 + the signal's number (130, 143), the resume command
printed. A second signal stops at once (``KeyboardInterrupt``).

A batch scheduler's SIGTERM before a preemption, or Ctrl-C, then loses at most the step
in flight instead of up to ``--save-every`` steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
  """The name of signal ``signum``, e.g. 'SIGTERM'."""
  return signal.Signals(signum).name


class Stopped(Exception):
  """Raised by the loop after the checkpoint of a stop request is saved; the message says
  where it stopped."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    """The shell's code for death by the signal: 128 + its number."""
    return 128 + self.signum


class StopRequest:
  """The signal received while ``catching``, if any. The handler only records it (no
  printing: it may interrupt a write to the same stream)."""

  def __init__(self):
    self.signum: int | None = None

  def handler(self, signum, frame):
    """The signal handler: records the first signal; a second one raises KeyboardInterrupt."""
    del frame
    if self.signum is not None:  # a second signal: the user does not want to wait
      raise KeyboardInterrupt
    self.signum = signum

  @contextlib.contextmanager
  def catching(self):
    """Installs the handler for SIGINT and SIGTERM (Python allows it in the main thread
    only; elsewhere the default behaviour stays), and puts the old ones back after."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    old = {s: signal.signal(s, self.handler) for s in SIGNALS}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)

  def agreed(self) -> int | None:
    """The signal, as every process sees it: a signal may reach some processes a step
    before others, and a checkpoint is saved by all of them together."""
    if jax.process_count() == 1:
      return self.signum
    seen = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(seen)) or None

"""Graceful stops: SIGTERM / SIGINT ask training to stop at the next epoch boundary.

A cluster preempts a job with SIGTERM and kills it a grace period later; a
user presses Ctrl-C. Inside `handle_signals(flag)` either signal only sets
`flag` (a StopFlag, passed explicitly to whoever checks it: the epoch loop of
m6jax.train.trainer, the cell loop of m6jax.track.sweep); the loop saves its
state at the epoch boundary and raises Preempted, which the entry points turn
into one line saying how to resume and a non-zero exit (128 + signal number).
A second signal while a stop is pending gets the signal's previous handler
(Ctrl-C twice: KeyboardInterrupt at once).

Handlers can only be installed from the main thread; elsewhere the flag is
returned as is (a caller can still set it) and nothing is installed. In a
multi-host run the processes agree on a stop (`requested_anywhere`), so they
all save the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
  """A stop request: `signum` of the first signal received (None: none yet)."""

  def __init__(self):
    self.signum: int | None = None

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else "none"

  def request(self, signum: int = signal.SIGTERM) -> None:
    """Asks for a stop, as the signal `signum` does."""
    if self.signum is None:
      self.signum = int(signum)


class Preempted(KeyboardInterrupt):
  """Training stopped on a signal at an epoch boundary (state saved when possible).

  A KeyboardInterrupt, so `except Exception` (one failed sweep cell, say) does
  not swallow it and the tracker records the run as KILLED, not FAILED.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


@contextlib.contextmanager
def handle_signals(flag: StopFlag | None = None, signals=SIGNALS):
  """Within the block, `signals` set `flag` (a new StopFlag when None); yields the flag.

  The previous handlers come back on exit; a second signal during the block
  is handled by the previous handler.
  """
  flag = StopFlag() if flag is None else flag
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = {s: signal.getsignal(s) for s in signals}

  def on_signal(signum, frame):
    if flag.requested:   # asked twice: the usual behaviour of the signal
      signal.signal(signum, previous[signum])
      old = previous[signum]
      if callable(old):
        old(signum, frame)
      else:
        os.kill(os.getpid(), signum)
      return
    flag.request(signum)
    # os.write: no buffered IO or logging locks inside a signal handler.
    os.write(2, f"\n[m6jax] {flag.name} received: stopping at the next epoch boundary "
                f"(send it again to stop at once)\n".encode())

  for s in signals:
    signal.signal(s, on_signal)
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def requested_anywhere(flag: StopFlag) -> bool:
  """Whether any process of the run was asked to stop; a multi-host run agrees on it
  (one all-gather: every process calls this at the same epoch boundary, so all stop
  together and save the same step), a single process just reads its flag."""
  if jax.process_count() == 1:
    return flag.requested
  signums = multihost_utils.process_allgather(np.asarray(flag.signum or 0, np.int32))
  signum = int(np.max(signums))
  if signum:
    flag.request(signum)
  return bool(signum)


def stopped_message(flag: StopFlag, epoch: int | None, saved: str | None,
                    checkpointing: bool = True) -> str:
  """One line: what stopped, where the state is, how to resume."""
  where = f"after epoch {epoch}" if epoch is not None else "before the first epoch"
  if saved:
    state = (f"state saved in {saved}; rerun the same command (same --workdir, without "
             "--restart) to resume from there")
  elif checkpointing:
    state = "no epoch was saved yet: rerun the same command to start again"
  else:
    state = "train.checkpoint=False: nothing was saved, a rerun trains from scratch"
  return f"stopped by {flag.name} {where}: {state}"

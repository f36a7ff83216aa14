"""The bookkeeping every training loop does around its iterations, in one object: the
progress bar, ``log.jsonl``, when to read the device-side statistics, when to checkpoint,
and when to stop.

    book = RunBook(steps=cfg.steps, start=start, batch=cfg.batch, ...)
    for step in range(start, cfg.steps):
        ...                                   # one iteration, no host sync
        tick = book.tick()
        if tick.read:                         # every log_every iterations, the last, and before a stop
            book.log(loss=..., postfix=...)   # one log.jsonl line with the window's images/s
        if tick.checkpoint:                   # every checkpoint_every iterations, the last, and before a stop
            save(tick.done)
        if tick.stop:                         # SIGINT/SIGTERM or the time budget
            break
    book.close()

With several processes the stop is agreed (one all-reduce) only at read points, so no
other iteration waits for the device or for another process.
"""

import time
from dataclasses import dataclass

from ipfm_fast.train import common, parallel


@dataclass
class Tick:
    done: int  # iterations finished
    read: bool  # read the statistics and log a line now
    checkpoint: bool  # write a checkpoint now
    last: bool  # the run ends after this iteration (its budget, or a stop)
    stop: bool  # stop early (a signal or the time budget)


class RunBook:
    """See the module docstring. ``elapsed0``: training seconds of the run before a resume;
    ``main``: whether this process writes the log (rank 0)."""

    def __init__(self, *, steps, start, batch, log_every, checkpoint_every, log_path, stack, desc, progress=None,
                 time_budget=None, elapsed0=0.0, dctx=None, device=None, main=True):
        self.steps, self.done, self.batch = steps, start, batch
        self.log_every, self.checkpoint_every, self.time_budget = log_every, checkpoint_every, time_budget
        self.elapsed0, self.dctx, self.device, self.main = float(elapsed0), dctx, device, main
        self.bar = common.progress(steps, initial=start, desc=desc, enabled=progress if main else False)
        self.signals = stack.enter_context(common.StopSignals())
        self.jsonl = stack.enter_context(common.JSONLLogger(log_path)) if main else None
        self.t0 = self._t_window = time.perf_counter()
        self._n_window = 0
        self.window_start = start  # the first iteration of the current log window is window_start + 1
        self.stop_reason = None

    @property
    def elapsed(self):
        """Training seconds of the whole run, resumes included."""
        return self.elapsed0 + time.perf_counter() - self.t0

    @property
    def seconds(self):
        """Seconds since this process started the loop."""
        return time.perf_counter() - self.t0

    def tick(self):
        """One iteration more; what to do after it."""
        self.done += 1
        self._n_window += self.batch
        self.bar.update(1)
        read = self.done % self.log_every == 0 or self.done == self.steps
        stop_here = self.signals.received is not None or (self.time_budget is not None
                                                           and self.elapsed >= self.time_budget)
        distributed = self.dctx is not None and self.dctx.enabled
        stop = (parallel.any_process(stop_here, self.dctx, self.device) if read else False) if distributed \
            else stop_here
        if stop:
            self.stop_reason = self.signals.received or "time budget"
        last = self.done == self.steps or stop
        return Tick(done=self.done, read=read or stop, checkpoint=self.done % self.checkpoint_every == 0 or last,
                    last=last, stop=stop)

    def log(self, postfix=None, **record):
        """The log window's line: ``record`` plus step, images/s of the window, images seen and
        training seconds; ``postfix`` (dict) goes on the progress bar. Starts a new window."""
        now = time.perf_counter()
        ips = self._n_window / max(now - self._t_window, 1e-9)
        if self.main:
            self.jsonl.log(step=self.done, **record, images_per_second=ips, images_seen=self.done * self.batch,
                           train_seconds=self.elapsed)
            self.bar.set_postfix(**(postfix or {}), img_s=f"{ips:.0f}")
        self._t_window, self._n_window, self.window_start = now, 0, self.done
        return ips

    def note(self, postfix=None, **record):
        """An extra log.jsonl line for this iteration (e.g. scores), without throughput."""
        if self.main:
            self.jsonl.log(step=self.done, images_seen=self.done * self.batch, train_seconds=self.elapsed, **record)
            if postfix:
                self.bar.set_postfix(**postfix)

    def close(self):
        self.bar.close()

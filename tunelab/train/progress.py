"""Training progress: loss, tokens/s and ETA; silent when quiet or not rank 0.

On a terminal, a rich progress bar. Piped or redirected (CI, nohup, a scheduler), a bar draws
nothing until it ends, so instead a plain line at a log step (train.log_every) whenever
PLAIN_EVERY_S have passed since the last one, and at the last step.
"""

from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    def __init__(self, enabled: bool, plain: bool | None = None, plain_every_s: float = PLAIN_EVERY_S):
        self.enabled, self.bar = enabled, None
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self.plain_every_s = plain_every_s

    def start(self, total: int, completed: int) -> None:
        if not self.enabled:
            return
        self.total, self.first_step, self.started, self.last_line = total, completed, time.monotonic(), None
        if self.plain:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
                            TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=completed, loss=float("nan"), tok_s=0.0)

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tok_s=tok_s)
        elif self.enabled and self.plain:
            now = time.monotonic()
            if step < self.total and self.last_line is not None and now - self.last_line < self.plain_every_s:
                return
            self.last_line = now
            per_step = (now - self.started) / max(step - self.first_step, 1)
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tok_s:,.0f} tok/s  "
                  f"ETA {_duration(per_step * (self.total - step))}", flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

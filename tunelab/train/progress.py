"""The rich progress bar: loss, tokens/s and ETA; silent when quiet or not rank 0."""

from __future__ import annotations


class ProgressBar:
    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def start(self, total: int, completed: int) -> None:
        if not self.enabled:
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

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

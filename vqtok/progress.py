"""The rich progress bar that fit, encode and decode show: count, bar, ETA and a status line."""

from __future__ import annotations


class ProgressBar:
    """`label [bar] done/total ETA status`; does nothing when disabled (other processes, tests, scripts)."""

    def __init__(self, label: str, total: int, completed: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        self.task = self.progress.add_task(label, total=total, completed=completed, status="")

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, completed: int | None = None, status: str | None = None) -> None:
        if self.enabled:
            fields = {"completed": completed} if completed is not None else {}
            if status is not None:
                fields["status"] = status
            self.progress.update(self.task, **fields)

"""Live progress of a search (rich) and its closing summary table.

Owns what the user sees while a study runs: trial n/N, elapsed and ETA, best so far, the last trial's
per-task scores and merge/eval seconds. Reads the study; never changes it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from optuna.trial import TrialState
from rich.console import Console
from rich.live import Live
from rich.table import Table

from search.report import summary_table
from search.store import best_complete, finished_trials


def _fmt_seconds(s: float | None) -> str:
    if s is None or s != s:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class SearchProgress:
    """A rich live panel when `live` and stderr is a terminal; one log line per trial otherwise."""

    def __init__(self, live: bool = True, console: Console | None = None, show_summary: bool = True):
        self.show_summary = show_summary
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.live_enabled = live and self.console.is_terminal
        self._live: Live | None = None
        self.study = None
        self.total: int | None = None
        self.timeout: float | None = None
        self.start = time.time()
        self.done_at_start = 0
        self.last = None

    @contextmanager
    def running(self, study, study_cfg, trials: int | None, timeout: float | None):
        self.study, self.total, self.timeout = study, trials, timeout
        self.start = time.time()
        self.done_at_start = finished_trials(study)
        budget = f"{trials} trials" if trials else ""
        budget += (" / " if budget and timeout else "") + (_fmt_seconds(timeout) if timeout else "")
        self.console.print(f"[bold]study {study_cfg.name}[/]: {study_cfg.merge.merge_method}, sampler "
                           f"{study_cfg.sampler.name}, pruner {study_cfg.pruner.name}, budget {budget}; "
                           f"{self.done_at_start} trials already done; storage in {study_cfg.output_dir}")
        if self.live_enabled:
            with Live(self._panel(), console=self.console, refresh_per_second=2, transient=False) as live:
                self._live = live
                try:
                    yield self
                finally:
                    live.update(self._panel())
                    self._live = None
        else:
            yield self

    def trial_done(self, study, trial) -> None:
        self.last = trial
        if self._live is not None:
            self._live.update(self._panel())
        else:
            self.console.print(self._line(study, trial), highlight=False, soft_wrap=True)

    def poll(self, study) -> None:
        if self._live is not None:
            self._live.update(self._panel())

    def note(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/]")

    # ---- rendering ------------------------------------------------------------------------------
    def _counts(self):
        done = finished_trials(self.study)
        return done, best_complete(self.study)

    def _eta(self, done: int) -> str:
        ran = done - self.done_at_start
        elapsed = time.time() - self.start
        etas = []
        if self.total and ran > 0:
            etas.append(elapsed / ran * max(0, self.total - done))
        if self.timeout:
            etas.append(max(0.0, self.timeout - elapsed))
        return _fmt_seconds(min(etas)) if etas else "-"

    def _line(self, study, trial) -> str:
        done, best = self._counts()
        total = f"/{self.total}" if self.total else ""
        state = trial.state.name.lower()
        if trial.state == TrialState.COMPLETE:
            scores = " ".join(f"{k}={v:.3f}" for k, v in trial.user_attrs.get("scores", {}).items())
            state = f"score {trial.user_attrs.get('score', float('nan')):.4f} ({scores})"
        elif trial.state == TrialState.FAIL:
            state = f"failed: {trial.user_attrs.get('fail_reason', 'interrupted or worker died')}"
        best_txt = f"best {best.user_attrs.get('score'):.4f} (#{best.number})" if best else "best -"
        timing = f"merge {trial.user_attrs.get('merge_s', 0):.2f}s eval {trial.user_attrs.get('eval_s', 0):.2f}s"
        return (f"trial {trial.number:>4} [{done}{total}] {state}; {timing}; {best_txt}; "
                f"elapsed {_fmt_seconds(time.time() - self.start)} eta {self._eta(done)}")

    def _panel(self) -> Table:
        done, best = self._counts()
        table = Table.grid(padding=(0, 2))
        total = f"/{self.total}" if self.total else ""
        table.add_row("trials", f"{done}{total}", "elapsed", _fmt_seconds(time.time() - self.start),
                      "eta", self._eta(done))
        if best is not None:
            scores = "  ".join(f"{k} {v:.3f}" for k, v in best.user_attrs.get("scores", {}).items())
            table.add_row("best", f"{best.user_attrs.get('score', float('nan')):.4f} (#{best.number})",
                          "tasks", scores, "", "")
        if self.last is not None:
            t = self.last
            scores = "  ".join(f"{k} {v:.3f}" for k, v in t.user_attrs.get("scores", {}).items())
            table.add_row("last", f"#{t.number} {t.state.name.lower()}", "tasks", scores or "-",
                          "merge/eval", f"{t.user_attrs.get('merge_s', 0):.2f}s / {t.user_attrs.get('eval_s', 0):.2f}s")
        return table

    # ---- the end ----------------------------------------------------------------------------------
    def summary(self, study, study_cfg) -> None:
        if not self.show_summary:
            return
        self.console.print(summary_table(study, study_cfg))

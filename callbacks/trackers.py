"""Experiment trackers: `WandbLogger` (Weights & Biases) and `TrackioLogger` (trackio), at StepLogger's steps and
under its names, the scalars TensorBoardLogger and JSONLLogger write; `records/<name>` outputs (RL rollouts, a dict
a completion) as the tracker's table. Optional extras, imported when a run begins:

    pip install "paperloop[wandb]"      # or paperloop[trackio]
    trainer = RLTrainer(..., callbacks=[WandbLogger(project="rlvr")])        # W&B's offline mode: mode="offline"
    trainer = RLTrainer(..., callbacks=[TrackioLogger(project="rlvr")])      # a local SQLite store, then `trackio show`

Both run with no network: W&B with `mode="offline"` (or WANDB_MODE=offline; `wandb sync` uploads later), trackio
always writes its local store first (TRACKIO_DIR, by default ~/.cache/huggingface/trackio).

One fit, one tracked run, named by the trainer's run id (`TrainState.run_id`, kept in every checkpoint), so a
resumed fit continues the run it resumes. The steps after the checkpoint were logged once already by the run that
went on past it (and was killed); neither tracker gets them twice:

- W&B: the resume rewinds the run's history to the step after the checkpoint's (`resume_from="<id>?_step=<c+1>"`):
  what the killed run logged from there on is set aside, and the resumed run logs it again. Rewinding is a W&B
  feature in preview on the hosted service; `rewind=False` resumes the run plainly instead (`resume="allow"`), and
  W&B then ignores the redone steps (it takes no step lower than the run's last), keeping the killed run's.
- trackio has no rewind: it resumes the run by name, and the logger reads what the store already holds for the run
  from the checkpoint's step on (a resumed run may close the checkpoint's epoch again) and does not log those
  (step, metric) pairs again. An exact resume recomputes the same values, so the curves are the straight run's; only
  the timings (`perf/*`) are the killed run's.

Every write is handed to the tracker as the step ends. trackio persists its queue every half second: at a checkpoint
TrackioLogger waits until its store holds every step logged so far, so a kill after a checkpoint loses nothing the
resumed run will not log again. W&B offers no such flush: its service writes the offline transaction log from a
buffer and completes it at `finish` (measured with wandb 0.31: a run SIGKILLed 4 s after its last log left a log
with no record in it), and online its file stream sends history at intervals; so a SIGKILL loses what W&B had not
written yet. A stop that ends the run (a signal, a time limit, Ctrl-C) finishes the W&B run first and loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time

from paperloop.rng import rng_state, set_rng_state

from .loggers import StepLogger, is_scalar, scalar


class TrackerLogger(StepLogger):
    """What the two trackers share: the run's identity, numbers as floats, records as rows, waiting at a checkpoint
    for what was logged. A subclass writes `_start(trainer, run_id, resume_step)`, `_log(values, step)`,
    `_table(rows, columns)`, `_durable()` (how far the tracker's store got) and `_finish()`."""

    def __init__(self, project: str, name: str | None = None, every_n_steps: int | None = None,
                 flush_timeout_s: float = 30.0):
        super().__init__(every_n_steps)
        if not isinstance(project, str) or not project:
            raise ValueError(f"{type(self).__name__}: project must be a non-empty string, got {project!r}")
        self.project, self.name, self.flush_timeout_s = project, name, flush_timeout_s
        self.run, self.last_logged = None, None

    def _open(self, trainer):
        start = trainer.state.global_step
        self.run_id = trainer.state.run_id
        self.last_logged = None
        # A logger leaves the run's random streams alone: importing trackio draws from python's `random` (measured,
        # trackio 0.43), and a resumed run, which imports it after restoring the streams, would leave the straight
        # run's path.
        streams = rng_state()
        try:
            self._start(trainer, self.run_id, start if start else None)
        finally:
            set_rng_state(streams)

    def _write(self, metrics: dict, step: int):
        values = {key: float(scalar(value)) for key, value in metrics.items() if is_scalar(value)}
        if values:
            self._log(values, step)
            self.last_logged = step

    def _write_records(self, records: dict, step: int):
        tables = {}
        for key, rows in records.items():
            if not isinstance(rows, (list, tuple)) or not all(isinstance(row, dict) for row in rows):
                raise TypeError(f"{key}: a records/ output is a list of dicts (a row each), got {type(rows).__name__}")
            columns = list(dict.fromkeys(column for row in rows for column in row))
            tables[key] = self._table([[cell(row.get(c)) for c in columns] for row in rows], columns)
        self._log(tables, step)

    def state_dict(self) -> dict:
        """Asked when a checkpoint is taken: wait until the tracker holds every step logged so far, so that a kill
        after this checkpoint loses none that the resumed run will not redo. Saves the run's id (for people)."""
        if self.active and self.last_logged is not None:
            deadline = time.monotonic() + self.flush_timeout_s
            while (self._durable() or 0) < self.last_logged:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{type(self).__name__}: the tracker's store did not reach step "
                                       f"{self.last_logged} within {self.flush_timeout_s} s")
                time.sleep(0.05)
        return {"run_id": getattr(self, "run_id", None)}

    def _close(self):
        if self.run is not None:
            self._finish()
            self.run = None

    def _start(self, trainer, run_id: str, resume_step: int | None) -> None:
        raise NotImplementedError

    def _log(self, values: dict, step: int) -> None:
        raise NotImplementedError

    def _table(self, rows: list[list], columns: list[str]):
        raise NotImplementedError

    def _durable(self) -> int | None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class WandbLogger(TrackerLogger):
    """A Weights & Biases run (id: the trainer's run id) in `project`, files under `directory` (default
    `output_dir`). `mode`: "online", "offline" or None (W&B's own default, WANDB_MODE). `records/<name>` outputs are
    `wandb.Table`s under their key. On resume: the history rewound to the step after the checkpoint's (see the
    module docstring), or with `rewind=False` a plain resume. `init_kwargs` go to `wandb.init` (entity, tags, ...)."""

    def __init__(self, project: str, name: str | None = None, every_n_steps: int | None = None,
                 directory: str | None = None, mode: str | None = None, rewind: bool = True, **init_kwargs):
        super().__init__(project, name, every_n_steps)
        if mode not in (None, "online", "offline"):
            raise ValueError(f"WandbLogger: mode must be 'online', 'offline' or None, got {mode!r}")
        self.directory, self.mode, self.rewind, self.init_kwargs = directory, mode, rewind, init_kwargs

    def _start(self, trainer, run_id, resume_step):
        import wandb

        directory = self.directory or trainer.config.output_dir
        if resume_step is None:
            where = {"id": run_id}
        elif self.rewind:
            where = {"resume_from": f"{run_id}?_step={resume_step + 1}"}
        else:
            where = {"id": run_id, "resume": "allow"}
        self.run = wandb.init(project=self.project, name=self.name, dir=directory, mode=self.mode,
                              config=config_dict(trainer.config), **where, **self.init_kwargs)
        self.wandb = wandb

    def _log(self, values, step):
        self.run.log(values, step=step)  # two writes of one step (a validation, a step's close) make one row

    def _table(self, rows, columns):
        return self.wandb.Table(columns=columns, data=rows)

    def _durable(self):
        return self.last_logged  # W&B has no flush to wait for (module docstring)

    def _finish(self):
        self.run.finish()


class TrackioLogger(TrackerLogger):
    """A trackio run (name: `name`, default the trainer's run id) in `project`, in trackio's local store.
    `records/<name>` outputs are `trackio.Table`s under their key. On resume, the same run (`resume="allow"`), with
    the steps it already holds after the checkpoint not logged again (see the module docstring). `init_kwargs` go to
    `trackio.init` (space_id to mirror to a Space, group, ...)."""

    def _start(self, trainer, run_id, resume_step):
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        self.trackio, self.storage = trackio, SQLiteStorage
        self.run_name = self.name or run_id
        # (metric, step) the store holds from the checkpoint's step on (a resumed run may close the checkpoint's
        # epoch again, logging at its step)
        self.held: set[tuple[str, int]] = set()
        if resume_step is not None:
            for row in SQLiteStorage.get_logs(self.project, self.run_name):
                if row["step"] >= resume_step:
                    self.held.update((key, row["step"]) for key in row if key not in ("step", "timestamp"))
        self.run = trackio.init(project=self.project, name=self.run_name, config=config_dict(trainer.config),
                                resume="allow" if resume_step is not None else "never", auto_log_gpu=False,
                                auto_log_cpu=False, embed=False)

    def _log(self, values, step):
        values = {key: value for key, value in values.items() if (key, step) not in self.held}
        if values:
            self.run.log(values, step=step)

    def _table(self, rows, columns):
        return self.trackio.Table(columns=columns, data=rows)

    def _durable(self):
        return self.storage.get_max_step_for_run(self.project, self.run_name)

    def _finish(self):
        self.run.finish()


def config_dict(config) -> dict:
    """The run's config as the tracker's config: JSON values (a path or a tuple as JSON has them)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def cell(value):
    """A record's value as a table cell: numbers, strings, bools and None as they are, anything else as JSON."""
    return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)

"""Callbacks of a run, as the Hugging Face Trainer calls them: any `transformers.TrainerCallback` works unchanged.

Each event calls `callback.EVENT(args, state, control, **kwargs)` on every process (`state.is_world_process_zero`
tells the main one), with `args` the run's config (a `TrainConfig` or `OnlineConfig`), `state` a
`transformers.TrainerState` (`global_step`, `max_steps`, `log_history`) and `control` a `TrainerControl`:

    on_train_begin   before the first step (of this invocation: a resumed run begins at its checkpoint)
    on_step_end      after each optimizer step
    on_log           logs = the row just written to metrics.jsonl
    on_evaluate      metrics = the held-out evaluation (eval_* keys): before training, every eval_steps, at the end
    on_save          checkpoint = the checkpoint directory just written
    on_train_end     run_dir = the finished run's directory

A callback that sets `control.should_training_stop` stops the run after that step with a checkpoint, as Ctrl-C
does; `train()` then returns and the run continues with `resume=True`. The command line passes no callback.
"""

from __future__ import annotations

from transformers import TrainerControl, TrainerState

from ..config import TetherError

EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


class Callbacks:
    """The callbacks of one run and the state they see."""

    def __init__(self, callbacks=(), args=None):
        self.callbacks = list(callbacks or ())
        for cb in self.callbacks:
            if not any(callable(getattr(cb, event, None)) for event in EVENTS):
                raise TetherError(
                    f"callback {cb!r} has none of the methods {', '.join(EVENTS)}; "
                    "subclass transformers.TrainerCallback"
                )
        self.args = args
        self.state = TrainerState()
        self.control = TrainerControl()

    def begin(self, accelerator, step: int, max_steps: int) -> None:
        self.state.global_step, self.state.max_steps = step, max_steps
        self.state.is_world_process_zero = accelerator.is_main_process
        self.state.is_local_process_zero = accelerator.is_local_main_process
        self.fire("on_train_begin")

    def fire(self, event: str, **kwargs) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if callable(method):
                method(self.args, self.state, self.control, **kwargs)

    def step_end(self, step: int) -> None:
        self.state.global_step = step
        self.fire("on_step_end")

    def log(self, row: dict) -> None:
        self.state.log_history.append(dict(row))
        self.fire("on_log", logs=row)

    def evaluate(self, metrics: dict) -> None:
        if metrics:
            self.fire("on_evaluate", metrics=metrics)

    @property
    def stop_requested(self) -> bool:
        return bool(self.callbacks) and bool(self.control.should_training_stop)

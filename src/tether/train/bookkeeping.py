"""What a run writes as it goes and at the end: metrics.jsonl and the trackers, the progress bar, results.json,
the final model, and the bookkeeping both loops share at their start (resume point, results header) and end
(final model, results.json, model card, report, finished marker)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker
from accelerate.utils import gather_object
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..config import TetherError
from ..files import new_private_dir, open_append, read_json, read_json_lines, share_like_umask, write_text_atomic
from ..models import any_process
from . import checkpoint
from .callbacks import Callbacks
from .card import data_files, model_card, versions
from .engine import crash_point, end_run
from .report import write_report_quietly
from .rundir import RunDir
from .stopping import StopRequests


def tensorboard_dir(cfg, run_dir: Path) -> Path:
    """Where TensorBoard writes: option logging_dir, else $TENSORBOARD_LOGGING_DIR (transformers 5's variable), else
    the run's tensorboard/."""
    return Path(cfg.logging_dir or os.environ.get("TENSORBOARD_LOGGING_DIR") or Path(run_dir) / "tensorboard")


class TensorBoardWriter(GeneralTracker):
    """accelerate's tracker interface over a TensorBoard writer that opens at the first logged step, with that step
    as its purge step: a resumed run's first step hides the events a killed run wrote from there on, so no step
    appears twice (TensorBoard's own rule for a restarted writer in the same directory)."""

    name = "tensorboard"
    requires_logging_directory = True

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir, self.writer, self.config = Path(log_dir), None, {}

    @property
    def tracker(self):
        return self.writer

    def store_init_configuration(self, values: dict) -> None:
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=step)
            self.writer.add_text("config", json.dumps(self.config, indent=1, default=str), global_step=step)
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def start_trackers(accelerator, cfg) -> None:
    """Start the metric trackers of report_to (after the run directory is claimed: they write into it). Each run
    is named after its directory in project "tether"; mlflow without MLFLOW_TRACKING_URI stores in the run's
    mlflow.db (SQLite: mlflow 3 refuses a new file store), trackio in its own local store ($TRACKIO_DIR, else
    ~/.cache/huggingface/trackio)."""
    wanted = [t for t in cfg.report_to if t != "none"]
    if not wanted:
        return
    run_dir = Path(accelerator.project_dir)
    config = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
    others = [t for t in wanted if t != "tensorboard"]  # accelerate starts these (engine.make_accelerator)
    if others:
        if "mlflow" in others and accelerator.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        names = {
            "wandb": {"name": run_dir.name},
            "trackio": {"name": run_dir.name},
            "mlflow": {"run_name": run_dir.name},
        }
        accelerator.init_trackers("tether", config=config, init_kwargs={t: names[t] for t in others})
    if "tensorboard" in wanted and accelerator.is_main_process:
        writer = TensorBoardWriter(tensorboard_dir(cfg, run_dir))
        writer.store_init_configuration(config)
        accelerator.trackers.append(writer)


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (main process only), flushed each time.

    On resume it keeps only the complete rows of steps up to the checkpoint: a line torn by a crash, or rows a
    killed run wrote after its checkpoint, are dropped (those steps are run again)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [row for row in read_json_lines(path) if row.get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open_append(self.path) as f:
            f.write((json.dumps(row) + "\n").encode("utf-8"))


# TRL's (HF Trainer's) names for the scalars tether logs; trackers get them under train/ and eval/ as in TRL
TRACKER_NAMES = {
    "reward_accuracy": "rewards/accuracies",
    "reward_margin": "rewards/margins",
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
    "logps_base": "logps/base",
    "logits_chosen": "logits/chosen",
    "logits_rejected": "logits/rejected",
    "lr": "learning_rate",
    "nll": "nll_loss",
}


def tracker_scalars(row: dict) -> dict:
    """A metrics row under TRL's TensorBoard/W&B names: train/rewards/margins, eval/logps/chosen,
    train/learning_rate ..."""
    out = {}
    for key, value in row.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        split, name = ("eval", key[5:]) if key.startswith("eval_") else ("train", key)
        out[f"{split}/{TRACKER_NAMES.get(name, name)}"] = value
    return out


def log_to_trackers(accelerator, row: dict, step: int) -> None:
    if accelerator.trackers:
        accelerator.log(tracker_scalars(row), step=step)


def mean_stats(stats: list[dict[str, torch.Tensor]], prefix: str = "") -> dict[str, float]:
    """Average per-pair statistics (lists of (n,) tensors) into one float per name."""
    if not stats:
        return {}
    return {prefix + k: torch.cat([s[k] for s in stats]).float().mean().item() for k in stats[0]}


def gathered_means(local: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    """Per name, the mean of the values of every process (each process calls this with its own lists)."""
    merged: dict[str, list[float]] = {}
    for part in gather_object([local]):
        for k, v in part.items():
            merged.setdefault(k, []).extend(v)
    return {prefix + k: sum(v) / len(v) for k, v in merged.items()}


def save_final(accelerator, model, tokenizer, run_dir: Path, write=None, card: str | None = None) -> Path:
    """Save the final model (full weights or PEFT adapter) and tokenizer atomically to run_dir/final.
    `write(directory)` replaces `model.save_pretrained(directory)` when the model needs its own way;
    `card` (markdown) becomes final/README.md, replacing PEFT's empty template."""
    final = run_dir / "final"
    if accelerator.is_main_process:
        tmp = new_private_dir(run_dir, "final.tmp-")  # never a final.tmp someone else put there
        try:
            (write or model.save_pretrained)(tmp)
            tokenizer.save_pretrained(tmp)
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8")
            share_like_umask(tmp)  # safetensors writes its weight files 0600
            crash_point("mid_final", 0)
            checkpoint.publish(tmp, final)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TetherError(
                f"{run_dir}: the final model could not be written ({checkpoint.brief_reason(e)}); nothing half-written "
                "is left and the checkpoints are kept: free some space and rerun with --resume"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    return final


class TrainingRun:
    """What the two run objects share (`offline.OfflineRun`, `online.OnlineRun`): the constructor checks the
    options and the data and claims the run directory (`self.claim`, `self.run_dir`); `run()` loads the models
    (`load_models`) and trains (`_loop`)."""

    claim: RunDir
    run_dir: Path
    callbacks: Callbacks
    stop: StopRequests | None = None

    def load_models(self) -> None:
        raise NotImplementedError

    def _loop(self) -> Path:
        raise NotImplementedError

    def _save_checkpoint(self, step: int) -> Path:
        raise NotImplementedError

    def run(self) -> Path:
        """Load the models and train (a finished run is left untouched); the run directory's lock is released
        at the end, whatever happens. During the loop, Ctrl-C and SIGTERM stop the run at a step end with a
        checkpoint (train/stopping.py)."""
        try:
            if self.claim.finished:
                return self.run_dir
            self.load_models()
            with StopRequests() as self.stop:
                run_dir = self._loop()
            self.callbacks.fire("on_train_end", run_dir=run_dir)
            return run_dir
        finally:
            self.stop = None
            self.claim.release()

    def saved(self, checkpoint_dir: Path) -> Path:
        """A checkpoint was just written: tell the callbacks."""
        self.callbacks.fire("on_save", checkpoint=checkpoint_dir)
        return checkpoint_dir

    def stop_if_asked(self, done: int, total: int) -> None:
        """At the end of step `done` (of `total`): after a signal, or when a callback set
        `control.should_training_stop`, save a checkpoint here and stop the run."""
        if done >= total:
            return
        by_callback = self.callbacks.stop_requested
        if self.callbacks.callbacks and self.acc.num_processes > 1:  # every process has the same callbacks
            by_callback = any_process(by_callback, self.acc.device)
        if by_callback or (self.stop is not None and self.stop.requested(self.acc)):
            save_steps = self.cfg.save_steps
            saved = self.run_dir / "checkpoints" / f"{checkpoint.PREFIX}{done:06d}"  # just now, by the loop
            saved = saved if save_steps and done % save_steps == 0 else self._save_checkpoint(done)
            if by_callback:
                raise StoppedByCallback(done, saved)
            raise self.stop.interrupted(done, saved)


class StoppedByCallback(Exception):
    """A callback asked the run to stop (`control.should_training_stop`); a checkpoint of `step` is saved."""

    def __init__(self, step: int, checkpoint_dir: Path):
        super().__init__(f"stopped by a callback after step {step}; checkpoint {checkpoint_dir} saved")
        self.step, self.checkpoint = step, checkpoint_dir


def progress_bar(accelerator, cfg, total: int, initial: int, desc: str) -> tqdm:
    """The run's progress bar (on the main process, when `progress` is on)."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", disable=not (cfg.progress and accelerator.is_main_process)
    )


def write_results(accelerator, run_dir: Path, results: dict) -> None:
    if accelerator.is_main_process:
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=1))


def resume_point(accelerator, claim, model, optimizer, scheduler, tensors=None) -> tuple[int, dict] | None:
    """A resumed run's (step, results so far), from its newest readable checkpoint and results.json; None for
    a run that starts from step 0 without a checkpoint."""
    if not claim.resumed:
        return None
    state = checkpoint.load_latest(accelerator, claim.path, model, optimizer, scheduler, tensors=tensors)
    if state is None:
        return None
    return state["step"], read_json(claim.path / "results.json")


def record_start(accelerator, run_dir: Path, results: dict, reference_label: str, setup: dict, **files) -> None:
    """results.json at the start of the run's steps: what π_ref is, the versions, the engine and the data files."""
    if accelerator.is_main_process:
        results.update(
            reference=reference_label, versions=versions(), distributed=setup, data_files=data_files(**files)
        )
    write_results(accelerator, run_dir, results)


def finish_run(accelerator, cfg, kind: str, claim, results: dict, model, tokenizer, steps: int, write, keep=()):
    """The end both loops share, once training and the final evaluation are done: the final model (written by
    `write(directory)`, or `model.save_pretrained`) with its card, results.json, the report, and the finished
    marker; then every process leaves together (`end_run`, which keeps `keep` alive). Returns the run directory."""
    run_dir = claim.path
    card = model_card(cfg, kind, run_dir, results) if accelerator.is_main_process else None
    final = save_final(accelerator, model, tokenizer, run_dir, write=write, card=card)
    if accelerator.is_main_process:
        results["final_model"] = str(final)
        write_results(accelerator, run_dir, results)
        if cfg.write_report:
            write_report_quietly(run_dir)
        claim.mark_finished(steps)
    end_run(accelerator, *keep)
    return run_dir


def run_summary(run_dir: Path) -> str:
    """The console summary at the end of a run (the `tether` command prints it): the held-out metrics before and
    after training, and where the run, its report and its final model are."""
    run_dir = Path(run_dir)
    results = read_json(run_dir / "results.json")
    before, after = results.get("initial_eval") or {}, results.get("final_eval") or {}
    lines = [f"run finished: {run_dir} ({results.get('steps', '?')} steps)"]
    keys = [k for k in {**before, **after} if isinstance({**before, **after}[k], (int, float))]
    if keys:
        width = max(len(k) for k in keys) - len("eval_")
        lines.append(f"  {'held-out':<{width}}  {'before':>10}  {'after':>10}")
        for k in keys:
            cells = [f"{d[k]:>10.4g}" if isinstance(d.get(k), (int, float)) else f"{'':>10}" for d in (before, after)]
            lines.append(f"  {k.removeprefix('eval_'):<{width}}  {cells[0]}  {cells[1]}")
    else:
        lines.append("  no held-out evaluation (set eval_file or eval_fraction)")
    for label, name in (("final model", "final"), ("report", "report.md"), ("metrics", "metrics.jsonl")):
        if (run_dir / name).exists():
            lines.append(f"  {label + ':':<13}{run_dir / name}")
    return "\n".join(lines)

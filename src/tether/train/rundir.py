"""A run directory is tether's only if tether made it, and one run at a time uses it.

- Marker: `.tether-run` (JSON: command, tether version, a random run id, the directory's identity — device and
  inode —, content fingerprints of the input files, fingerprints of the models, the environment variables that
  change training, state) is the first file tether writes into a new or empty directory. A directory that is
  not empty and has no marker is never written to, whatever `output_dir` says; nor is one whose marker records
  another directory's inode (a marker copied from a run, or a run copied elsewhere).
- Lock: `.tether-lock`, held with an OS lock (`flock`) for the life of the run and never opened through a
  symbolic link. The OS drops the lock when its process dies, so a lock left by a killed run is never mistaken
  for a live one; the file holds the pid of the holder for the error message.
- Resume: the options must be the ones the run started with (apart from those in `SAFE_TO_CHANGE`, which do
  not alter what is trained), the input files must have the same content, the models the same fingerprint
  (card.model_fingerprint) and the training environment variables (`training_environment`) the same values;
  `config.yaml` is never rewritten. A finished run is reported as finished and left untouched.
- A claim that fails while creating the directory removes the directory it created: nothing is left behind.

Only the main process looks at the directory; its verdict (or its error) is broadcast to every process, so all
of them stop together with the same one-line error.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TetherError, brief, config_to_dict, field_default, read_yaml_mapping, save_config
from ..files import write_text_atomic
from .card import file_fingerprint, model_fingerprint, versions
from .engine import from_main
from .marker import MARKER, new_marker, read_marker

log = logging.getLogger("tether")

LOCK = ".tether-lock"
# options a resumed run may change: they decide what is logged, saved or how long an oracle call may take,
# never what is trained
SAFE_TO_CHANGE = frozenset(
    {
        "output_dir",
        "progress",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "report_to",
        "logging_dir",
        "eval_steps",
        "oracle_timeout",
        "oracle_retries",
        "oracle_backoff",
        "max_oracle_failure_rate",
        "oracle_failure_patience",
        "vllm_url",  # where the sampler's server is (a restarted server may listen elsewhere)
        "vllm_python",
        "vllm_timeout",
    }
)
_HELD: dict[str, int] = {}  # run directory -> file descriptor holding its lock

# environment variables that change what is trained: accelerate's (ACCELERATE_GRADIENT_ACCUMULATION_STEPS rescales
# every gradient, ACCELERATE_MIXED_PRECISION, FSDP_* ...), torch's determinism and precision switches, tether's own
ENV_PREFIXES = ("ACCELERATE_", "FSDP_", "TETHER_")
ENV_NAMES = ("CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
# ... but these, which decide where caches go, what is logged, or are fault-injection hooks of the tests
ENV_IGNORED = frozenset(
    {
        "TETHER_CACHE",
        "TETHER_VLLM_PYTHON",
        "TETHER_CRASH_AT",
        "TETHER_CRASH_AFTER_STEP",
        "ACCELERATE_LOG_LEVEL",
        "ACCELERATE_DEBUG_MODE",
        "ACCELERATE_CPU_AFFINITY",
        "ACCELERATE_CONFIG_DS_FIELDS",
    }
)


def training_environment() -> dict[str, str]:
    """The environment variables (ENV_PREFIXES, ENV_NAMES, but ENV_IGNORED) set now that change training."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if (k.startswith(ENV_PREFIXES) or k in ENV_NAMES) and k not in ENV_IGNORED
    }


def check_environment(env: dict[str, str]) -> None:
    """Refuse what tether's loops cannot honour: accelerate's own gradient accumulation (tether accumulates
    itself; accelerate would divide every gradient once more)."""
    accum = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accum not in (None, "1"):
        raise TetherError(
            f"environment variable ACCELERATE_GRADIENT_ACCUMULATION_STEPS={brief(accum)}: tether accumulates "
            "gradients itself; unset it (or the accelerate config's gradient_accumulation_steps) and use the option "
            "gradient_accumulation_steps instead"
        )


def model_fingerprints(cfg, given: dict[str, str] | None = None) -> dict[str, str]:
    """Option -> fingerprint of the model directories a run reads (model, ref_model, a reward-model oracle; an
    adapter together with its base); `given`: option -> fingerprint of an in-memory model used for it."""
    from ..models import adapter_base, is_adapter_dir, resolve_model_path

    named = {"model": cfg.model, "ref_model": getattr(cfg, "ref_model", None)}
    oracle = getattr(cfg, "oracle", "") or ""
    if oracle.startswith("reward-model:"):
        named["oracle"] = oracle.removeprefix("reward-model:")
    out = dict(given or {})
    for option, name in named.items():
        if name and option not in out:
            path = resolve_model_path(name)
            fp = model_fingerprint(path)
            out[option] = f"{fp}+{model_fingerprint(adapter_base(path))}" if is_adapter_dir(path) else fp
    return out


@dataclass
class RunDir:
    path: Path
    command: str
    resumed: bool = False
    finished: bool = False
    marker: dict = field(default_factory=dict)

    def mark_finished(self, step: int) -> None:
        """Main process: record that final/ and results.json are complete."""
        self.marker.update(
            state="finished",
            finished_step=step,
            finished=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        write_text_atomic(self.path / MARKER, json.dumps(self.marker, indent=1) + "\n")

    def release(self) -> None:
        release_lock(self.path)


def release_lock(path: Path) -> None:
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def _lock(path: Path) -> None:
    key = str(path.resolve())
    if key in _HELD:
        raise TetherError(f"{path}: this process already runs in this directory; use another output_dir")
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise TetherError(
            f"{path / LOCK}: is a symbolic link, which tether did not make; it never writes through one: remove the "
            "link or choose another output_dir"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise TetherError(
            f"{path}: another tether process (pid {holder}) is running in this directory; "
            "wait for it to finish or choose another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def _config_differences(cfg, saved: dict) -> list[str]:
    """Options (other than SAFE_TO_CHANGE) whose value differs from the run's config.yaml; an option the saved
    file does not have (added by a newer tether) counts as changed only when it is not at its default."""
    now, defaults = config_to_dict(cfg), {f.name: field_default(f) for f in dataclasses.fields(cfg)}
    return [k for k in now if k not in SAFE_TO_CHANGE and now[k] != saved.get(k, defaults.get(k))]


def _claim(run_dir: Path, command: str, cfg, inputs: dict[str, str | None], resume: bool, given=None) -> RunDir:
    """The main process's checks and first writes (see the module docstring)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TetherError(f"option 'output_dir': {run_dir} is a file, not a directory; choose a directory path")
    if os.path.lexists(run_dir / LOCK):  # a live run first: its directory may not have its marker yet
        try:
            _lock(run_dir)
        except OSError as e:
            raise TetherError(
                f"option 'output_dir': cannot write into {run_dir} ({e.strerror or e}); choose a directory "
                "you can write to"
            ) from None
    try:
        return _claim_locked(run_dir, command, cfg, inputs, resume, given)
    except BaseException:
        release_lock(run_dir)
        raise


def _claim_locked(run_dir: Path, command: str, cfg, inputs, resume: bool, given=None) -> RunDir:
    marker = read_marker(run_dir) if run_dir.is_dir() else None
    fingerprints = {name: file_fingerprint(p) for name, p in inputs.items() if p}
    environment, models = training_environment(), model_fingerprints(cfg, given)
    check_environment(environment)
    if marker is None:
        if run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()):
            raise TetherError(
                f"option 'output_dir': {run_dir} is not empty and is not a tether run (no {MARKER} marker); tether "
                "writes only into new or empty directories or its own runs: choose another output_dir"
            )
        marker = _start(run_dir, command, cfg, inputs=fingerprints, models=models, environment=environment)
        if resume:
            log.info("%s: nothing to resume; starting a new run", run_dir)
        return RunDir(run_dir, command, marker=marker)

    if str(run_dir.resolve()) not in _HELD:
        _lock(run_dir)
    if marker.get("command") != command:
        raise TetherError(
            f"{run_dir}: holds a `tether {marker.get('command')}` run, not a `tether {command}` run; "
            "choose another output_dir"
        )
    if not resume:
        raise TetherError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another output_dir")
    if marker.get("state") == "finished":
        log.info("%s: the run already finished (step %s); nothing to do", run_dir, marker.get("finished_step"))
        return RunDir(run_dir, command, resumed=True, finished=True, marker=marker)
    try:
        saved = read_yaml_mapping(run_dir / "config.yaml")
    except TetherError:
        raise TetherError(
            f"{run_dir / 'config.yaml'}: missing or unreadable, so the run cannot be resumed safely; "
            "start a new run in another output_dir"
        ) from None
    changed = _config_differences(cfg, saved)
    if changed:
        now = config_to_dict(cfg)
        name = changed[0]
        raise TetherError(
            f"--resume: option '{name}' is {brief(now.get(name))} but the run in {run_dir} used "
            f"{brief(saved.get(name))}"
            + (f" (also changed: {', '.join(changed[1:])})" if changed[1:] else "")
            + "; a resumed run keeps its options: drop the change, or start a new run in another output_dir"
        )
    _check_same_inputs(run_dir, cfg, marker, fingerprints, models, environment)
    return RunDir(run_dir, command, resumed=True, marker=marker)


def _start(run_dir: Path, command: str, cfg, **fields) -> dict:
    """Create (or take the empty) `run_dir`, lock it, write its marker and config.yaml; a failure removes the
    directory when this call created it."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if str(run_dir.resolve()) not in _HELD:
            _lock(run_dir)
        marker = new_marker(
            run_dir,
            command,
            tether_version=versions()["tether"],
            state="running",
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **fields,
        )
        write_text_atomic(run_dir / MARKER, json.dumps(marker, indent=1) + "\n")
        save_config(cfg, run_dir / "config.yaml")
    except (OSError, TetherError) as e:
        if created:
            release_lock(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(e, TetherError):
            raise
        raise TetherError(
            f"option 'output_dir': cannot write into {run_dir} ({e.strerror or e}); choose a directory you can write to"
        ) from None
    return marker


def _check_same_inputs(run_dir: Path, cfg, marker: dict, fingerprints, models, environment) -> None:
    """--resume: the data files, the models and the training environment are the ones the run started with
    (what the marker did not record, an older tether did not record, and is not compared)."""
    for name, fp in fingerprints.items():
        if marker.get("inputs", {}).get(name) not in (None, fp):
            raise TetherError(
                f"--resume: {getattr(cfg, name)} ({name}) changed since the run started (its content "
                "differs); restore it, or start a new run in another output_dir"
            )
    for name, fp in models.items():
        if marker.get("models", {}).get(name) not in (None, fp):
            raise TetherError(
                f"--resume: the model of option '{name}' ({brief(getattr(cfg, name, ''), 200)}) changed since the run "
                "started (its files differ in names, sizes, safetensors headers or sampled content); restore it, "
                "or start a new run in another output_dir"
            )
    recorded = marker.get("environment")
    if isinstance(recorded, dict):
        changed = sorted(k for k in recorded.keys() | environment.keys() if recorded.get(k) != environment.get(k))
        if changed:
            name = changed[0]
            now, then = environment.get(name), recorded.get(name)
            raise TetherError(
                f"--resume: environment variable {name} is {brief(now) if now is not None else 'unset'} but the run "
                f"started with {brief(then) if then is not None else 'it unset'}"
                + (f" (also changed: {', '.join(changed[1:5])})" if changed[1:] else "")
                + "; a resumed run keeps its environment: restore it, or start a new run in another output_dir"
            )


def claim_run_dir(accelerator, command: str, cfg, inputs: dict[str, str | None], resume: bool, given=None) -> RunDir:
    """Check and claim `cfg.output_dir` for a `command` run (main process), and tell every process the outcome.
    `inputs` names the option of each input file whose content must not change across a resume; `given`: option
    -> fingerprint of an in-memory model (`model_fingerprints`)."""
    run_dir = Path(cfg.output_dir)
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome = [_claim(run_dir, command, cfg, inputs, resume, given)]
        except TetherError as e:
            outcome = [e]
    outcome = from_main(accelerator, outcome[0])
    if isinstance(outcome, TetherError):
        raise TetherError(str(outcome))
    return outcome

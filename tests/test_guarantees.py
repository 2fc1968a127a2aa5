"""docs/guarantees.md, tried as a hostile and as an unlucky user would (issue 22): nothing executable is loaded,
tether writes only what it created, a resumed run is the same run, every check comes before the run directory
is claimed, and every failure is one line (a full disk, Ctrl-C, SIGTERM). Real files, real processes, real
signals; the disk-full test mounts a small tmpfs (root only)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import (
    ROOT,
    jsonl_rows,
    lora_run_args,
    one_error_line,
    online_run_args,
    run_cli,
    same_weights,
    snapshot,
)
from tether.cli import main
from tether.config import TetherError

TESTS = str(Path(__file__).parent)


class Planted:
    """A pickle that makes a directory when it is unpickled: proof that a file was (not) run."""

    def __init__(self, proof: Path):
        self.proof = str(proof)

    def __reduce__(self):
        return (os.mkdir, (self.proof,))


def plant_pickle(path: Path, proof: Path) -> None:
    path.write_bytes(pickle.dumps(Planted(proof)))


@pytest.fixture(scope="module")
def offline(model_dir, data_dir, tmp_path_factory):
    """A small LoRA run with dropout (the RNG state must come back too) and its uninterrupted result."""
    work = tmp_path_factory.mktemp("guarantees")
    args = lora_run_args(model_dir, data_dir / "train.jsonl", work / "cache")
    full = run_cli(*args, "--output_dir", str(work / "full"))
    assert full.returncode == 0, full.stderr
    return args, work / "full"


def crashed(args, run: Path, step: int = 5, **env) -> None:
    res = run_cli(*args, "--output_dir", str(run), env={"TETHER_CRASH_AT": f"after_step:{step}", **env})
    assert res.returncode == 17, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- 1. no code runs


def test_checkpoints_hold_no_pickle_and_a_planted_one_is_never_run(offline, tmp_path):
    args, full = offline
    run, proof, kept = tmp_path / "run", tmp_path / "ran", tmp_path / "kept"
    crashed(args, run)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    assert {p.suffix for p in ckpts.rglob("*") if p.is_file()} == {".json", ".safetensors"}
    # an older tether's checkpoints (optimizer state pickled in optim.pt): refused in one line, never unpickled
    for step in ("step-000002", "step-000004"):
        (kept / step).mkdir(parents=True)
        for name in ("optim.json", "optim.safetensors"):
            shutil.move(ckpts / step / name, kept / step / name)
        plant_pickle(ckpts / step / "optim.pt", proof)
    err = one_error_line(run_cli(*args, "--output_dir", str(run), "--resume"))
    assert "written by an older tether" in err and "never loads" in err
    assert not proof.exists()
    # a pickle planted in the newest checkpoint: that checkpoint is damaged (the damage check reads no pickle
    # either), the run falls back to the previous one and ends as the uninterrupted run did
    for name in ("optim.json", "optim.safetensors"):
        shutil.move(kept / "step-000002" / name, ckpts / "step-000002" / name)
        shutil.move(kept / "step-000004" / name, ckpts / "step-000004" / name)
    (ckpts / "step-000002" / "optim.pt").unlink()
    plant_pickle(ckpts / "step-000004" / "rng_0.pt", proof)
    resumed = run_cli(*args, "--output_dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-000004 is damaged" in resumed.stderr and "'optim.pt'" in resumed.stderr
    assert not proof.exists()
    assert same_weights(full, run)
    umask = os.umask(0)
    os.umask(umask)
    weights = run / "final" / "adapter_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600


def test_a_model_directory_with_its_own_code_is_refused_even_when_the_prompt_is_answered_yes(
    model_dir, data_dir, tmp_path
):
    evil, proof = tmp_path / "evil", tmp_path / "ran"
    shutil.copytree(model_dir, evil)
    (evil / "evil.py").write_text(f"import os\nos.mkdir({str(proof)!r})\n")
    config = json.loads((evil / "config.json").read_text())
    config.update(
        model_type="evil-custom", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Model"}
    )
    (evil / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((evil / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (evil / "tokenizer_config.json").write_text(json.dumps(tok_config))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tether.cli", "train", "--model", str(evil), "--train_file"]
    res = subprocess.run(
        [*cmd, str(data_dir / "train.jsonl"), "--output_dir", str(out), "--max_steps", "1"],
        input="y\ny\ny\n",  # transformers asks on stdin whether to run the directory's code
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf")},
        timeout=600,
    )
    assert "cannot load" in one_error_line(res)
    assert not proof.exists() and not out.exists()


def test_an_oracle_gets_copies_of_the_prompts():
    from tether.oracles import Annotator, CallableOracle

    sys.path.insert(0, TESTS)
    import toy_oracles

    prompts = [[{"role": "user", "content": "Which colour is the sky?"}], "a plain prompt"]
    before = json.dumps(prompts)
    notes = Annotator(CallableOracle(toy_oracles.editing), retries=0).annotate(
        prompts, [("blue", "a very long answer"), ("x", "yy")], [1, 2]
    )
    assert [n.label for n in notes] == [0, 0]
    assert json.dumps(prompts) == before


# ---------------------------------------------------------------------------------------------- 2. own files only


def test_export_and_report_write_only_what_they_create(model_dir, tmp_path, capsys):
    from tether.models import add_lora, load_model
    from tether.train.marker import MARKER, new_marker

    adapter = tmp_path / "adapter"
    add_lora(load_model(model_dir), 4, 8, 0.0, None).save_pretrained(adapter)
    out, foreign_tmp = tmp_path / "merged", tmp_path / "merged.tmp"
    foreign_tmp.mkdir()
    (foreign_tmp / "notes.txt").write_text("mine")
    umask = os.umask(0o022)
    try:
        assert main(["export", "--merge", str(adapter), "--out", str(out)]) == 0
    finally:
        os.umask(umask)
    assert (foreign_tmp / "notes.txt").read_text() == "mine"  # a D.tmp tether did not make is left alone
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp directory left
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert main(["export", "--merge", str(adapter), "--out", str(tmp_path / "link")]) == 2
    assert "is a symbolic link" in capsys.readouterr().err and not any(target.iterdir())

    # report: a directory with a config.yaml but no marker is not tether's; its report.md stays
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("model: m\n")
    (foreign / "report.md").write_text("my report")
    assert main(["report", str(foreign)]) == 2
    assert "not a tether run directory" in capsys.readouterr().err
    assert (foreign / "report.md").read_text() == "my report"
    # a marked run whose plots/ is a link: refused, the link's target untouched; report.md as a link is replaced
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps(new_marker(run, "train")))
    (run / "config.yaml").write_text("model: m\nloss: dpo\nbeta: 0.1\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n')
    victim = tmp_path / "victim.md"
    victim.write_text("not tether's")
    (run / "report.md").symlink_to(victim)
    (run / "plots").symlink_to(target)
    assert main(["report", str(run)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err and not any(target.iterdir())
    (run / "plots").unlink()
    assert main(["report", str(run)]) == 0
    assert victim.read_text() == "not tether's" and not (run / "report.md").is_symlink()
    assert (run / "plots" / "loss.png").is_file()
    # a config.yaml that is not a mapping, and a marker copied into another directory: one line each
    (run / "config.yaml").write_text("- a\n- b\n")
    assert main(["report", str(run)]) == 2
    assert "not a mapping of option: value" in capsys.readouterr().err
    shutil.copy(run / MARKER, foreign / MARKER)
    assert main(["report", str(foreign)]) == 2
    assert "written for another directory" in capsys.readouterr().err
    assert (foreign / "report.md").read_text() == "my report"


def test_a_planted_lock_link_and_a_copied_marker_are_refused(offline, tmp_path):
    args, full = offline
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / ".tether-lock").symlink_to(victim)
    assert "is a symbolic link" in one_error_line(run_cli(*args, "--output_dir", str(planted)))
    assert victim.read_text() == "precious"
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "metrics.jsonl").write_text("my own metrics\n")
    (foreign / "checkpoints" / "step-000002").mkdir()
    shutil.copy(full / ".tether-run", foreign / ".tether-run")
    shutil.copy(full / "config.yaml", foreign / "config.yaml")
    before = snapshot(foreign)
    assert "written for another directory" in one_error_line(run_cli(*args, "--output_dir", str(foreign), "--resume"))
    assert snapshot(foreign) == before


# ---------------------------------------------------------------------------------------------- 3. the same run


def test_resume_refuses_a_changed_environment_or_a_model_changed_in_place(offline, model_dir, tmp_path):
    args, full = offline
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    own = list(args)
    own[own.index("--model") + 1] = str(model)
    run = tmp_path / "run"
    crashed(own, run, step=3)
    before = snapshot(run)
    err = one_error_line(run_cli(*own, "--output_dir", str(run), "--resume", env={"CUBLAS_WORKSPACE_CONFIG": ":16:8"}))
    assert "environment variable CUBLAS_WORKSPACE_CONFIG is ':16:8' but the run started with it unset" in err
    env = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}
    err = one_error_line(run_cli(*own, "--output_dir", str(run), "--resume", env=env))
    assert "tether accumulates gradients itself" in err
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(weights)
    save_file({k: v + 1e-3 for k, v in tensors.items()}, weights, metadata={"format": "pt"})  # same names and shapes
    err = one_error_line(run_cli(*own, "--output_dir", str(run), "--resume"))
    assert "the model of option 'model'" in err and "changed since the run started" in err
    assert snapshot(run) == before
    weights.write_bytes(original)
    resumed = run_cli(*own, "--output_dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(full, run)


def test_the_ledger_never_deletes_a_recorded_answer(tmp_path):
    from tether.train.ledger import Ledger

    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, writable=True)
    for step in range(3):
        ledger.append(step, [{"slot": 0, "status": "ok", "label": 0}, {"slot": 1, "status": "tie", "label": None}])
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 7 and lines[-1] == b""
    damaged = b"\n".join([*lines[:2], b'{"step": 1, "slot"', *lines[3:]])
    path.write_bytes(damaged)
    with pytest.raises(TetherError, match=r"ledger.jsonl:line 3: damaged record"):
        Ledger(path, writable=True)
    assert path.read_bytes() == damaged  # nothing truncated away
    whole = b"\n".join(lines)
    path.write_bytes(whole + b'{"step": 3, "slot": 0, "sta')  # torn by a killed writer: dropped
    reopened = Ledger(path, writable=True)
    assert path.read_bytes() == whole and reopened.count() == 6
    path.write_bytes(whole + json.dumps({"step": 3, "slot": 0, "rows_in_step": 1, "status": "ok"}).encode())
    reopened = Ledger(path, writable=True)  # a whole record without its newline: kept, its line completed
    assert reopened.rows(3) is not None and path.read_bytes().endswith(b"}\n")


# ---------------------------------------------------------------------------------------------- 4. checks first


@pytest.fixture(scope="module")
def odd_models(model_dir, tmp_path_factory):
    """An adapter trained on another base (a different width), and the model with no chat template."""
    from tether.models import add_lora, load_model
    from tether_lab.demo import toy_model

    work = tmp_path_factory.mktemp("odd-models")
    other = toy_model(work / "other", hidden_size=16, num_layers=1, vocab_size=400)
    add_lora(load_model(other), 4, 8, 0.0, None).save_pretrained(work / "adapter")
    config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(model_dir)  # claims a base it was not trained on
    (work / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    plain = work / "no-template"
    shutil.copytree(model_dir, plain)
    tok = json.loads((plain / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    (work / "not-a-dir").write_text("x")
    (work / "chat.jsonl").write_text('{"prompt": "hi"}\n{"prompt": [{"role": "user", "content": "hi"}]}\n')
    return work


CHECKS_FIRST = [
    ("train", ["--lora", "true", "--lora_target_modules", "q_projj"], "lora_target_modules"),
    ("train", ["--ref_model", "{work}/missing"], "no such directory"),
    ("train", ["--model", "{work}/adapter", "--lora", "true"], "cannot apply the adapter"),
    ("train", ["--ref_cache_dir", "{work}/not-a-dir/cache"], "option 'ref_cache_dir': cannot write into"),
    ("online", ["--lora", "true", "--lora_target_modules", "q_projj"], "lora_target_modules"),
    ("online", ["--reference", "fixed", "--ref_model", "{work}/missing"], "no such directory"),
    ("online", ["--model", "{work}/no-template", "--prompt_file", "{work}/chat.jsonl"], "chat.jsonl:line 2"),
]


@pytest.mark.parametrize("command, extra, answer", CHECKS_FIRST, ids=[f"{c[0]} {c[2]}" for c in CHECKS_FIRST])
def test_every_check_comes_before_the_run_directory_is_claimed(
    command, extra, answer, odd_models, model_dir, data_dir, prompt_file, tmp_path, capsys
):
    out = tmp_path / "run"
    base = ["--model", str(model_dir), "--output_dir", str(out), "--max_length", "64", "--max_prompt_length", "32"]
    if command == "train":
        base += ["--train_file", str(data_dir / "train.jsonl"), "--max_steps", "1"]
    else:
        base += [
            "--prompt_file",
            str(prompt_file),
            "--oracle",
            "callable:toy_oracles:shorter",
            "--steps",
            "1",
            "--phases",
            "1",
        ]
    argv = [command, *base, "--progress", "false", *[a.replace("{work}", str(odd_models)) for a in extra]]
    sys.path.insert(0, TESTS)
    rc = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tether: error:")]
    assert rc == 2 and len(lines) == 1 and answer in lines[0], lines
    assert not out.exists()  # a corrected command is not refused as "already holds a run"


# ---------------------------------------------------------------------------------------------- 5. disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root, as in CI); the test is skipped where it cannot be mounted."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the disk-full test needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()})")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_abandons_the_checkpoint_and_keeps_the_previous_one(offline, small_disk):
    args, full = offline
    run = small_disk / "run"
    crashed(args, run, step=3)
    ckpt = run / "checkpoints" / "step-000002"
    kept = snapshot(ckpt)
    need = sum(p.stat().st_size for p in ckpt.iterdir())
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 8 * 4096))  # room for the small files before the checkpoint, not for it
    assert need > 12 * 4096
    err = one_error_line(run_cli(*args, "--output_dir", str(run), "--resume"))
    assert "step 4: the checkpoint could not be written" in err and "No space left on device" in err
    assert "previous checkpoints are kept" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # no step-000004(.tmp)
    assert snapshot(ckpt) == kept
    filler.unlink()
    resumed = run_cli(*args, "--output_dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(full, run)


# ---------------------------------------------------------------------------------------------- 5. signals


@pytest.fixture(scope="module")
def online_slow(model_dir, prompt_file, tmp_path_factory):
    """An online run whose oracle takes its time (so a signal lands mid-run) and its uninterrupted result."""
    work = tmp_path_factory.mktemp("online-slow")
    oracle = ("--oracle", "callable:toy_oracles:shorter_slowly")
    args = [*online_run_args(model_dir, prompt_file), *oracle, "--save_steps", "0", "--logging_steps", "1"]
    env = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    res = run_cli(*args, "--output_dir", str(work / "full"), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return args, work / "full", env


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_checkpoints_the_step_and_stops_in_one_line(online_slow, tmp_path, sig):
    args, full, env = online_slow
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", *args, "--output_dir", str(run)],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "TOY_ORACLE_SLEEP": "1.5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)  # during step 2, in its slow annotation
    _, stderr = proc.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.startswith("tether: error:")]
    assert proc.returncode == 128 + sig and len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert f"stopped by {signal.Signals(sig).name} after step 2" in lines[0] and "--resume" in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert not (run / "final").exists()
    resumed = run_cli("online", "--output_dir", str(run), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(full, run)
    assert sorted((r["step"], r["slot"]) for r in jsonl_rows(run / "ledger.jsonl")) == [
        (s, k) for s in range(6) for k in range(4)
    ]

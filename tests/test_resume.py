"""Production behaviour of the trainer: exact resume from checkpoints (after an exception, SIGTERM, kill -9),
crash-safe checkpoint files (corrupted or half-written ones are skipped with a clear message), and the NaN
guard. Tiny in-process teachers (tests/test_train.py builds them)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdistil import checkpoint as fd_checkpoint  # noqa: E402
from fastdistil import fileio as fd_fileio  # noqa: E402
from fastdistil import train as fd_train  # noqa: E402
from fastdistil.objectives import Objective  # noqa: E402
from tests.test_train import _args, _interrupt_on_call, _teacher  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weights(run_dir):
    model = transformers.AutoModelForMaskedLM.from_pretrained(run_dir / "student")
    return model.state_dict()


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical (CPU, fp32, same thread count)


def _run(tmp_path, teacher, name, *extra):
    return fd_train.train(fd_train.resolve_config(_args(tmp_path, teacher, name, *extra)))


STEPS = ["--max_steps", "10", "--checkpoint_interval", "3", "--learning_rate", "2e-3", "--batch_size", "4"]


def test_resume_after_an_interrupt_is_bit_identical(tmp_path, monkeypatch):
    teacher = _teacher(tmp_path, mlm=True)
    assert _run(tmp_path, teacher, "straight", *STEPS).exit_code == 0

    _interrupt_on_call(monkeypatch, 7)  # in the middle of step 7
    assert _run(tmp_path, teacher, "resumed", *STEPS).exit_code == 130
    monkeypatch.undo()
    assert [p.name for p in fd_checkpoint.complete(tmp_path / "resumed")] == ["step-6", "step-3"]
    assert _run(tmp_path, teacher, "resumed", *STEPS, "--resume").exit_code == 0
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")


def test_corrupted_and_half_written_checkpoints_are_skipped(tmp_path, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    steps = ["--max_steps", "12", "--checkpoint_interval", "3", "--batch_size", "4", "--keep_checkpoints", "2"]
    assert _run(tmp_path, teacher, "straight", *steps).exit_code == 0
    assert _run(tmp_path, teacher, "run2", *steps).exit_code == 0
    run2 = tmp_path / "run2"
    assert [p.name for p in fd_checkpoint.complete(run2)] == ["step-9", "step-6"]  # the newest 2 of 3, 6, 9
    state = run2 / "checkpoints" / "step-9" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    half = run2 / "checkpoints" / ".step-12.tmp"  # what a kill -9 during a save leaves
    half.mkdir()
    (half / "trainer_state.pt").write_bytes(b"partial")
    capsys.readouterr()
    assert _run(tmp_path, teacher, "run2", *steps, "--resume").exit_code == 0
    err = capsys.readouterr().err
    assert "step-9/trainer_state.pt is unreadable" in err and "falling back to step-6" in err
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(run2))


def test_resume_errors_are_clear(tmp_path, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    capsys.readouterr()
    assert fd_train.main(_args(tmp_path, teacher, "nothing", "--resume")) == 2
    assert "holds no fastdistil run" in capsys.readouterr().err


def _subprocess_run(tmp_path, teacher, name, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(torch.get_num_threads()))
    args = [sys.executable, "-m", "fastdistil.train", *_args(tmp_path, teacher, name, *extra)]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared:\n{proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_resume_after_sigterm_or_kill9_of_a_real_process(tmp_path, how):
    teacher = _teacher(tmp_path, mlm=False)
    steps = ["--max_steps", "60", "--checkpoint_interval", "4", "--batch_size", "4", "--learning_rate", "2e-3"]
    proc = _subprocess_run(tmp_path, teacher, "run", *steps)
    _wait_for(tmp_path / "run" / "checkpoints" / "step-8" / fd_checkpoint.MARKER, proc)
    os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    proc.wait(timeout=120)
    if how == "sigterm":
        assert proc.returncode == 130, proc.stderr.read()[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "student").exists()
    assert _run(tmp_path, teacher, "run", *steps, "--resume").exit_code == 0
    assert _run(tmp_path, teacher, "straight", *steps).exit_code == 0
    straight = transformers.AutoModel.from_pretrained(tmp_path / "straight" / "student").state_dict()
    resumed = transformers.AutoModel.from_pretrained(tmp_path / "run" / "student").state_dict()
    _assert_same_weights(straight, resumed)


def test_nan_guard_skips_bad_steps_and_stops_after_too_many(tmp_path, monkeypatch, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    calls = {"n": 0}
    real_call = Objective.__call__

    def nan_on_calls(bad):
        def call(self, *args):
            calls["n"] += 1
            losses = real_call(self, *args)
            if bad == "all" or calls["n"] in bad:
                losses.terms["loss_ce"] = torch.tensor(float("nan"))
                losses.total = losses.total * float("nan")
            return losses

        return call

    monkeypatch.setattr(Objective, "__call__", nan_on_calls({2, 3}))
    result = _run(tmp_path, teacher, "some", "--max_steps", "5", "--batch_size", "4")
    assert result.exit_code == 0
    lines = [json.loads(x) for x in (tmp_path / "some" / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if "skipped_step" in x]
    assert [x["bad_terms"] for x in skipped] == [["loss_ce"], ["loss_ce"]]
    assert [x["bad_steps_in_a_row"] for x in skipped] == [1, 2]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4, 5]
    assert all(x["loss"] == x["loss"] for x in lines if "loss" in x)  # no NaN reached a recorded step
    assert all(torch.isfinite(p).all() for p in result.student.parameters())

    calls["n"] = 0
    monkeypatch.setattr(Objective, "__call__", nan_on_calls("all"))
    capsys.readouterr()
    result = _run(tmp_path, teacher, "all", "--max_steps", "50", "--batch_size", "4", "--max_bad_steps", "4")
    assert result.exit_code == 1
    err = capsys.readouterr().err
    assert "4 steps in a row had a non-finite loss" in err and "loss_ce" in err


def _kill9_during_a_save(tmp_path, teacher, name, steps):
    """Start a run and kill -9 it while a checkpoint is being written (its hidden temporary directory exists
    and at least one complete checkpoint precedes it). Returns the name of the half-written directory, or None
    when the kill landed just after the save completed."""
    proc = _subprocess_run(tmp_path, teacher, name, *steps)
    root = tmp_path / name / "checkpoints"
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < 120:
            if root.is_dir():
                names = [e.name for e in os.scandir(root)]  # one listing: a save in progress and a finished one
                saving = [n for n in names if n.startswith(".step-")]
                if saving and any(n.startswith("step-") for n in names):
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
                    return saving[0] if (root / saving[0]).exists() else None
        raise AssertionError(f"no checkpoint save was caught:\n{proc.stderr.read()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill9_in_the_middle_of_a_checkpoint_save(tmp_path):
    teacher = _teacher(tmp_path, mlm=False)
    steps = ["--max_steps", "40", "--checkpoint_interval", "2", "--batch_size", "4", "--learning_rate", "2e-3"]
    for attempt in range(3):  # the save lasts milliseconds: a kill can land just after it; try again then
        name = f"run{attempt}"
        half_written = _kill9_during_a_save(tmp_path, teacher, name, steps)
        if half_written:
            break
    assert half_written, "three kills all missed the save window"
    newest = fd_checkpoint.complete(tmp_path / name)[0]
    assert fd_checkpoint.load_state(newest)["step"] < int(half_written.split("-")[1].split(".")[0])
    assert _run(tmp_path, teacher, name, *steps, "--resume").exit_code == 0
    assert _run(tmp_path, teacher, "straight", *steps).exit_code == 0
    straight = transformers.AutoModel.from_pretrained(tmp_path / "straight" / "student").state_dict()
    resumed = transformers.AutoModel.from_pretrained(tmp_path / name / "student").state_dict()
    _assert_same_weights(straight, resumed)


def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    fd_fileio.atomic_write(path, '{"a": 1}')
    fd_fileio.atomic_write(path, b'{"a": 2}')
    assert path.read_text() == '{"a": 2}' and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

    def crash(*args):
        raise OSError("disk died before the rename")

    monkeypatch.setattr(fd_fileio.os, "replace", crash)
    with pytest.raises(OSError):
        fd_fileio.atomic_write(path, '{"a": 3}')
    assert path.read_text() == '{"a": 2}'  # the file is the old one, whole

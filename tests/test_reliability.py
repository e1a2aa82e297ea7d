"""Reliability classes: nothing of the user's is ever deleted, a full disk is one line and loses no trained
weights, every phase of a run survives a signal, empty and NaN inputs behave on every op, and bad input of every
kind is one `error:` line with exit code 2 before any long work."""

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastdistil  # noqa: E402
from fastdistil import compress as fd_compress  # noqa: E402
from fastdistil import evaluate as fd_eval  # noqa: E402
from fastdistil import fileio  # noqa: E402
from fastdistil import train as fd_train  # noqa: E402
from fastdistil.ops import op_module  # noqa: E402
from tests.test_train import _args, _teacher, _tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_error(capsys, *needles):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ---------------------------------------------------------------------------------------------------------
# Data loss


def test_compress_never_deletes_what_is_not_its_own(tmp_path, capsys):
    model = _teacher(tmp_path, mlm=False)
    base = ["--model", str(model), "--method", "magnitude", "--data", "", "--quiet", "--repeats", "1",
            "--warmup", "0", "--seq_len", "16", "--max_seq_len", "32", "--batch_size", "2"]  # fmt: skip
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    capsys.readouterr()
    assert fd_compress.main(base + ["--out", str(mine)]) == 2
    _one_error(capsys, "not empty and holds no fastdistil output")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert fd_compress.main(base + ["--out", str(tmp_path)]) == 2  # the parent of --model
    _one_error(capsys, "holds the input")
    assert (model / "config.json").is_file()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert fd_compress.main(base + ["--out", str(a_file)]) == 2
    _one_error(capsys, "is a file")
    assert a_file.read_text() == "x" and not list(tmp_path.glob(".a-file*"))  # no hidden copy left
    out = tmp_path / "sparse"
    assert fd_compress.main(base + ["--out", str(out)]) == 0
    assert fd_compress.main(base + ["--out", str(out)]) == 0  # an output of ours: replaced
    assert (out / fd_compress.MARKER).is_file()


def test_evaluate_refuses_a_file_or_a_foreign_directory_as_out(tmp_path, capsys):
    model = _teacher(tmp_path, mlm=False)
    base = ["--teacher", str(model), "--students", str(model), "--data", "", "--quiet"]
    a_file = tmp_path / "report"
    a_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "report.md").write_text("my own report")
    capsys.readouterr()
    for out, message in ((a_file, "is a file"), (foreign, "holds no fastdistil output")):
        t0 = time.perf_counter()
        assert fd_eval.main(base + ["--out", str(out)]) == 2
        _one_error(capsys, message)
        assert time.perf_counter() - t0 < 5  # refused before any model loads
    assert (foreign / "report.md").read_text() == "my own report"


def test_atomic_directory_replaces_only_its_own_and_reports_a_full_disk(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes").write_text("mine")
    with pytest.raises(fastdistil.errors.UsageError, match="not a fastdistil output"):
        with fileio.atomic_directory(foreign, marker="COMPLETE"):
            pass
    assert (foreign / "notes").read_text() == "mine"

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "fsync_tree", full)
    with pytest.raises(fileio.DiskFullError, match=r"cannot write .*/out: no space left on device \(about 3 MB"):
        with fileio.atomic_directory(tmp_path / "out", expected_bytes=3 * 2**20) as tmp:
            (tmp / "w").write_bytes(b"0" * 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]  # no temporary directory left


def test_a_full_disk_at_the_final_save_keeps_the_trained_student(tmp_path, monkeypatch, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    real = fileio.fsync_tree
    run = tmp_path / "run"

    def full_under_the_run(path):
        if str(path).startswith(str(run)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(fileio, "fsync_tree", full_under_the_run)
    capsys.readouterr()
    assert fd_train.main(_args(tmp_path, teacher, "run", "--max_steps", "3")) == 2
    line = _one_error(capsys, f"cannot write {run / 'student'}: no space left on device", "KB needed",
                      "the trained student was saved to")  # fmt: skip
    rescued = line.rsplit("saved to ", 1)[1].split(" instead")[0]
    try:
        assert transformers.AutoModelForMaskedLM.from_pretrained(rescued).config.num_hidden_layers == 2
    finally:
        shutil.rmtree(rescued)


# ---------------------------------------------------------------------------------------------------------
# Signals in every phase, and runs that never started


def _start(tmp_path, teacher, name, patch_code):
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r})\n{patch_code}\n"
        "from fastdistil import train\n"
        f"sys.exit(train.main(sys.argv[1:]))"
    )
    return subprocess.Popen([sys.executable, "-c", code, *_args(tmp_path, teacher, name, "--max_steps", "2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.parametrize("phase", ["fastdistil.data:tokenise", "fastdistil.heldout:compare"],
                         ids=["tokenisation", "first-evaluation"])  # fmt: skip
def test_sigterm_before_the_first_step_leaves_nothing_in_the_way(tmp_path, phase):
    teacher = _teacher(tmp_path, mlm=True)
    module, name = phase.split(":")
    slow = (
        f"import time, {module} as m\n"
        f"real = m.{name}\n"
        "def slow(*a, **k):\n"
        "    print('IN THE PHASE', flush=True); time.sleep(60); return real(*a, **k)\n"
        f"m.{name} = slow"
    )
    proc = _start(tmp_path, teacher, "run", slow)
    for line in proc.stdout:
        if "IN THE PHASE" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert proc.returncode == 130 and "before the first training step" in err, err
    assert not (tmp_path / "run").exists()
    assert fd_train.main(_args(tmp_path, teacher, "run", "--max_steps", "2")) == 0  # the same command runs


def test_a_run_killed_before_its_first_step_is_restarted_not_blocking(tmp_path, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")  # what kill -9 during the first evaluation leaves
    (run / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert fd_train.main(_args(tmp_path, teacher, "run", "--max_steps", "2", "--resume")) == 2
    _one_error(capsys, "stopped before its first step", "without --resume")
    assert fd_train.main(_args(tmp_path, teacher, "run", "--max_steps", "2")) == 0
    assert (run / "student" / "model.safetensors").is_file()


def test_a_crash_before_the_first_step_leaves_nothing(tmp_path, monkeypatch):
    teacher = _teacher(tmp_path, mlm=True)
    from fastdistil import trainer as fd_trainer

    def crash(self):
        raise RuntimeError("out of memory in the first evaluation")

    monkeypatch.setattr(fd_trainer.Trainer, "fit", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        fd_train.main(_args(tmp_path, teacher, "run", "--max_steps", "2"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# Ops: empty inputs, NaN, temperatures


@pytest.mark.parametrize("shape", [(2, 4, 0, 8), (2, 0, 5, 8), (0, 4, 5, 8)], ids=["L=0", "heads=0", "B=0"])
def test_attention_on_empty_inputs_returns_empty_outputs_on_every_implementation(shape):
    q = torch.randn(shape, requires_grad=True)
    out = fastdistil.attention(q, q, q)
    out.sum().backward()
    assert out.shape == shape and q.grad.shape == shape and not q.grad.any()
    mod = op_module("attention")
    for name, fwd in mod.FWD_IMPLS.items():
        if name.startswith("cuda"):
            continue
        o, lse = fwd(q.detach(), q.detach(), q.detach(), None, None, 0, 0.0, 0.125, 0)
        assert o.shape == shape and lse.shape == shape[:3], name
    x = torch.randn(0, 4, 8)
    assert fastdistil.attention_varlen(x, x, x, torch.zeros(1, dtype=torch.int32), 0).shape == (0, 4, 8)


def test_loss_ops_on_zero_rows_return_zero():
    s = torch.randn(0, 10, requires_grad=True)
    assert fastdistil.kd_loss(s, torch.randn(0, 10)).item() == 0.0
    assert fastdistil.cosine_loss(torch.randn(0, 8), torch.randn(0, 8)).item() == 0.0
    ce, mlm = fastdistil.fused_distill_head(torch.randn(0, 8), torch.randn(20, 8), None, torch.randn(0, 8),
                                            torch.randn(20, 8), None)  # fmt: skip
    assert ce.item() == 0.0 and mlm.item() == 0.0


def test_attention_nan_in_a_query_row_gives_nan_in_that_row_only():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    q[1, 2, 4, 5] = float("nan")
    out = fastdistil.attention(q, k, v)
    assert torch.isnan(out[1, 2, 4]).all()
    bad = torch.zeros(2, 3, 6, dtype=torch.bool)
    bad[1, 2, 4] = True
    assert torch.isfinite(out[~bad]).all()


def test_kd_loss_refuses_temperatures_beyond_fp32s_range_and_is_accurate_up_to_it():
    torch.manual_seed(0)
    s, t = torch.randn(8, 100), 3 * torch.randn(8, 100)
    ref = op_module("kd_loss").kd_loss_ref
    for T in (1.0, 10.0, 100.0):
        got, want = fastdistil.kd_loss(s, t, T).item(), ref(s.double(), t.double(), T).item()
        assert abs(got - want) <= 1e-3 * abs(want), (T, got, want)
    for T in (101.0, 1e5, 1e6):
        with pytest.raises(ValueError, match="above 100"):
            fastdistil.kd_loss(s, t, T)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written, before the long work


def test_bad_corpora_name_the_file_and_what_is_wrong(tmp_path, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    rnd = tmp_path / "random.txt"
    rnd.write_bytes(bytes(range(128, 256)) * 40)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    fake_gz = tmp_path / "corpus.txt.gz"
    fake_gz.write_text("not compressed\n")
    cut_gz = tmp_path / "cut.txt.gz"
    cut_gz.write_bytes(gzip.compress(os.urandom(30000).hex().encode())[:2000])  # incompressible: the cut shows
    capsys.readouterr()
    for path, message in ((rnd, "is not UTF-8 text"), (latin, "is not UTF-8 text (byte 0xe9 at offset 3)"),
                          (fake_gz, "is not a gzip file"), (cut_gz, "is a damaged gzip file")):  # fmt: skip
        assert fd_train.main(_args(tmp_path, teacher, "bad", "--max_steps", "1", "--data", str(path))) == 2
        _one_error(capsys, str(path), message)
        assert not (tmp_path / "bad").exists()


def test_resume_falls_back_when_any_file_of_the_newest_checkpoint_is_damaged(tmp_path, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    steps = ["--max_steps", "9", "--checkpoint_interval", "3", "--batch_size", "4"]
    assert fd_train.main(_args(tmp_path, teacher, "straight", *steps)) == 0
    assert fd_train.main(_args(tmp_path, teacher, "run", *steps)) == 0
    weights = tmp_path / "run" / "checkpoints" / "step-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    assert fd_train.main(_args(tmp_path, teacher, "run", *steps, "--resume")) == 0
    err = capsys.readouterr().err
    assert "step-6/model.safetensors is unreadable" in err and "falling back to step-3" in err, err
    straight = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "straight" / "student").state_dict()
    resumed = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "student").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def _causal_lm(tmp_path):
    path = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=len(_tokenizer(tmp_path)), n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64)  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    _tokenizer(tmp_path).save_pretrained(path)
    return path


def test_train_bad_models_and_paths_are_one_line(tmp_path, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    truncated = tmp_path / "truncated"
    transformers.AutoModelForMaskedLM.from_pretrained(teacher).save_pretrained(truncated)
    _tokenizer(tmp_path).save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    gpt2 = _causal_lm(tmp_path)
    gpt2_config = gpt2 / "config.json"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    capsys.readouterr()
    cases = [
        (["--teacher", str(truncated)], "cannot read its weights"),
        (["--teacher", str(gpt2), "--student_layers", "0,1"], "model_type 'gpt2' is not a BERT-family encoder"),
        (["--student_config", str(gpt2_config)], "model_type 'gpt2' is not a BERT-family encoder"),
        (["--dump_path", str(a_file / "run")], "is a file, not a directory"),
        (["--mlm_smoothing", "nan"], "mlm_smoothing must be a finite number >= 0"),
        (["--word_mask", "1.2", "--word_keep", "-0.1", "--word_rand", "-0.1"], "word_mask must be in [0, 1]"),
        (["--adam_epsilon", "-1"], "adam_epsilon must be a finite number > 0"),
        (["--temperature", "inf"], "temperature must be in (0, 100]"),
        (["--temperature", "1e6"], "temperature must be in (0, 100]"),
    ]
    for extra, message in cases:
        assert fd_train.main(_args(tmp_path, teacher, "bad", "--max_steps", "1") + extra) == 2, extra
        _one_error(capsys, message)
        assert not (tmp_path / "bad").exists(), extra


def test_evaluate_bad_flags_are_one_line_before_the_work(tmp_path, capsys):
    model = _teacher(tmp_path, mlm=False)
    base = ["--teacher", str(model), "--students", str(model), "--quiet", "--out", str(tmp_path / "eval")]
    capsys.readouterr()
    for extra, message in [
        (["--seq_len", "100"], "--seq_len 100: the teacher"),
        (["--seq_len", "16", "--max_seq_len", "100", "--data", "builtin:web-bible"], "--max_seq_len 100: the teacher"),
        (["--finetune_lr", "-1"], "--finetune_lr must be a finite number > 0"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    ]:
        t0 = time.perf_counter()
        assert fd_eval.main(base + extra) == 2, extra
        _one_error(capsys, message)
        assert time.perf_counter() - t0 < 10, extra  # before the held-out text is tokenised
    if not torch.cuda.is_available():
        assert fd_eval.main(base + ["--device", "cuda"]) == 2
        _one_error(capsys, "no CUDA device here")


def test_config_values_from_a_file_are_checked_like_flags(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"kernels": "bogus", "precision": "fp8"}))
    capsys.readouterr()
    assert fd_train.main(["--config", str(cfg)]) == 2
    _one_error(capsys, "kernels must be one of fused, reference")

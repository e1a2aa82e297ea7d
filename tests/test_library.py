"""The training core as a library: half-precision teacher checkpoints train, the Python API distils from a
datasets.Dataset, fastdistil's objective runs inside a transformers.Trainer, a broken first batch fails in
seconds (before tokenisation), every option from every source goes through one declaration, and the
fused / reference switch belongs to the ops."""

import dataclasses
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import fastdistil  # noqa: E402
from fastdistil import config as fd_config  # noqa: E402
from fastdistil import data as fd_data  # noqa: E402
from fastdistil import models as fd_models  # noqa: E402
from fastdistil import objectives  # noqa: E402
from fastdistil import train as fd_train  # noqa: E402
from fastdistil.errors import UsageError  # noqa: E402
from fastdistil.ops import cosine_loss, fused_distill_head, kd_loss, op_module, use_kernels  # noqa: E402
from tests.test_train import _args, _corpus, _metrics, _teacher, _tokenizer  # noqa: E402


def _half_teacher(tmp_path, mlm: bool, dtype: torch.dtype):
    """A tiny teacher checkpoint stored in half precision, as many published checkpoints are."""
    path = _teacher(tmp_path, mlm=mlm)
    auto = transformers.AutoModelForMaskedLM if mlm else transformers.AutoModel
    half = tmp_path / f"{'mlm' if mlm else 'enc'}-{str(dtype)[6:]}"
    auto.from_pretrained(path).to(dtype).save_pretrained(half)
    _tokenizer(tmp_path).save_pretrained(half)
    assert json.loads((half / "config.json").read_text())["dtype"] == str(dtype)[6:]
    return half


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mlm", [True, False], ids=["distilbert", "hidden_states"])
def test_half_precision_teacher_checkpoints_train(tmp_path, mlm, dtype):
    teacher = _half_teacher(tmp_path, mlm, dtype)
    r = fd_train.train(fd_train.resolve_config(_args(tmp_path, teacher, "run", "--max_steps", "4")))
    assert r.exit_code == 0
    steps = _metrics(tmp_path / "run")
    assert len(steps) == 4 and all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
    assert all(p.dtype == torch.float32 for p in r.student.parameters())  # fp32 master weights
    auto = transformers.AutoModelForMaskedLM if mlm else transformers.AutoModel
    saved = auto.from_pretrained(tmp_path / "run" / "student")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    assert json.loads((tmp_path / "run" / "student" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("teacher_dtype", ["bf16", "fp16"])
def test_teacher_dtype_flag_sets_the_teachers_compute_dtype(tmp_path, teacher_dtype, monkeypatch):
    seen = {}
    real = objectives.DistilBERTObjective.terms

    def terms(self, *args):
        seen["dtype"] = next(self.teacher.parameters()).dtype
        return real(self, *args)

    monkeypatch.setattr(objectives.DistilBERTObjective, "terms", terms)
    teacher = _teacher(tmp_path, mlm=True)
    args = _args(tmp_path, teacher, "run", "--max_steps", "2", "--teacher_dtype", teacher_dtype)
    assert fd_train.train(fd_train.resolve_config(args)).exit_code == 0
    assert seen["dtype"] == {"bf16": torch.bfloat16, "fp16": torch.float16}[teacher_dtype]
    assert all(math.isfinite(s["loss"]) for s in _metrics(tmp_path / "run"))


def test_a_broken_first_batch_fails_before_tokenisation(tmp_path, monkeypatch, capsys):
    teacher = _teacher(tmp_path, mlm=True)

    def broken(self, *args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x32 and 16x8)")

    def tokenise(*args, **kwargs):
        raise AssertionError("the whole corpus was tokenised before the first batch ran")

    monkeypatch.setattr(objectives.DistilBERTObjective, "terms", broken)
    monkeypatch.setattr(fd_data, "tokenise", tokenise)
    capsys.readouterr()
    assert fd_train.main(_args(tmp_path, teacher, "bad", "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the first batch fails" in errors[0] and "mat1 and mat2" in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "bad").exists()


def test_the_first_batch_leaves_no_trace(tmp_path):
    """The fail-fast batch runs under a forked RNG and drops its gradients: a run has the loss curve, to the last
    digit logged, of the same run without it."""
    from fastdistil import job

    teacher = _teacher(tmp_path, mlm=True)
    runs = {}
    for name in ("a", "b"):
        c = fd_train.resolve_config(_args(tmp_path, teacher, name, "--max_steps", "3"))
        assert fd_train.train(c).exit_code == 0
        runs[name] = [s["loss"] for s in _metrics(tmp_path / name)]
    real_probe = job.probe
    try:
        job.probe = lambda *a, **k: None
        fd_train.train(fd_train.resolve_config(_args(tmp_path, teacher, "no-probe", "--max_steps", "3")))
    finally:
        job.probe = real_probe
    assert runs["a"] == runs["b"] == [s["loss"] for s in _metrics(tmp_path / "no-probe")]


def test_python_api_distils_from_a_dataset(tmp_path):
    tok = _tokenizer(tmp_path)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)  # fmt: skip
    teacher = transformers.BertForMaskedLM(cfg)
    texts = datasets.Dataset.from_dict({"text": _corpus(tmp_path).read_text().splitlines()})
    options = dict(max_steps=6, batch_size=8, max_seq_len=32, eval_fraction=0.1, num_proc=1, learning_rate=3e-3,
                   cache_dir=str(tmp_path / "cache"), student_layers=[0, 3])  # fmt: skip
    result = fastdistil.distil(teacher, texts, tokenizer=tok, dump_path=str(tmp_path / "api"), **options)
    assert result.exit_code == 0 and result.summary["steps"] == 6
    assert result.summary["after"]["student_teacher_kl"] < result.summary["before"]["student_teacher_kl"]
    result.student.save_pretrained(tmp_path / "saved")
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.num_hidden_layers == 2
    ids = torch.randint(5, len(tok), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.student.eval()(input_ids=ids).logits)
    recorded = json.loads((tmp_path / "api" / "train_config.json").read_text())
    assert recorded["teacher"] == "<BertForMaskedLM object>" and recorded["data"].startswith("<datasets.Dataset")


def test_python_api_refuses_bad_input_with_one_clear_error(tmp_path):
    tok = _tokenizer(tmp_path)
    teacher = transformers.BertModel(transformers.BertConfig(vocab_size=len(tok), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))  # fmt: skip
    cases = [
        (dict(teacher=teacher, data=["some text"]), "needs its tokenizer"),
        (dict(teacher=42, data=None), "must be a path"),
        (dict(teacher=teacher, data={"text": ["x"]}, tokenizer=tok), "data must be"),
        (dict(teacher=teacher, data=["x"], tokenizer=tok, precision="fp8"), "precision must be one of"),
        (dict(teacher=teacher, data=["x"], tokenizer=tok, max_steps="3"), "max_steps must be an integer"),
        (dict(teacher=teacher, data=["x"], tokenizer=tok, tempreature=2.0), "unknown option"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            fastdistil.distil(**kwargs, dump_path=str(tmp_path / "never"))
        assert not (tmp_path / "never").exists()


def test_transformers_trainer_with_the_fastdistil_objective_lowers_the_loss(tmp_path):
    pytest.importorskip("accelerate")
    from fastdistil.hf import DistillationTrainer

    tok = _tokenizer(tmp_path)
    teacher = transformers.AutoModelForMaskedLM.from_pretrained(_teacher(tmp_path, mlm=True))
    student = fd_models.student_from_teacher(teacher, [0, 3])
    lines = _corpus(tmp_path).read_text().splitlines()
    ds = datasets.Dataset.from_dict(dict(tok(lines, truncation=True, max_length=32)))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=30, per_device_train_batch_size=8,
                                          learning_rate=3e-3, logging_steps=5, report_to=[], use_cpu=True,
                                          save_strategy="no", seed=0)  # fmt: skip
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds,
                                  data_collator=transformers.DataCollatorForLanguageModeling(tok))  # fmt: skip
    trainer.train()
    logged = [x for x in trainer.state.log_history if "loss" in x and "loss_ce" in x]
    assert len(logged) == 6, trainer.state.log_history
    assert logged[-1]["loss"] < 0.8 * logged[0]["loss"], logged
    assert all({"loss_mlm", "loss_cos"} <= set(x) for x in logged)
    student.eval()  # no dropout: the two calls below see the same network
    with torch.no_grad():  # the Trainer's loss is the objective's weighted total
        batch = trainer.data_collator([ds[i] for i in range(4)])
        direct = trainer.objective(batch["input_ids"], batch["attention_mask"], batch["labels"])
        via_trainer = trainer.compute_loss(student, batch)
    assert torch.equal(direct.total, via_trainer)


def test_every_option_is_declared_once_and_the_config_is_frozen(tmp_path):
    flags = {a.dest for a in fd_train.build_parser()._actions if a.dest != "help"}
    assert flags == set(fd_config.OPTIONS) == {f.name for f in dataclasses.fields(fd_config.TrainConfig)}
    c = fd_train.resolve_config(["--batch_size", "4"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.batch_size = 8
    for values, message in [
        ({"kernels": "bogus"}, "kernels must be one of fused, reference"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"temperature": "2"}, "temperature must be a number"),
        ({"max_steps": "3"}, "max_steps must be an integer"),
        ({"student_layers": ""}, "must list at least one layer"),
        ({"checkpoint_interval": -1}, "checkpoint_interval must be >= 0"),
        ({"warmup_prop": float("nan")}, "warmup_prop must be in"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"device": "tpu"}, "device must be cpu, cuda or cuda:N"),
    ]:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(values))
        with pytest.raises(UsageError, match=message):
            fd_train.resolve_config(["--config", str(path)])
        with pytest.raises(UsageError, match=message):
            fd_config.resolve(values)
    binary = tmp_path / "c.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="not a readable UTF-8 text file"):
        fd_train.resolve_config(["--config", str(binary)])


def test_reference_kernels_are_a_property_of_the_ops():
    torch.manual_seed(0)
    s, t = torch.randn(6, 50, requires_grad=True), torch.randn(6, 50)
    mask = torch.tensor([True, True, False, True, False, True])
    kd, cos = op_module("kd_loss"), op_module("cosine_loss")
    with use_kernels("reference"):
        assert torch.equal(kd_loss(s, t, 2.0, mask), kd.kd_loss_ref(s, t, 2.0, mask))
        assert torch.equal(cosine_loss(s, t, mask), cos.cosine_loss_ref(s, t, mask))
        per_row = kd_loss(s, t, 2.0, mask, reduction="none")
        w, b = torch.randn(50, 50), torch.randn(50)
        head = fused_distill_head(s, w, b, t, w, b, kl_mask=mask)
    torch.testing.assert_close(per_row, kd_loss(s, t, 2.0, mask, reduction="none"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head[0], fused_distill_head(s, w, b, t, w, b, kl_mask=mask)[0], rtol=1e-5, atol=1e-6)
    per_row.sum().backward()  # the reference is plain autograd
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="kernels must be one of"):
        with use_kernels("fast"):
            pass


def test_a_narrower_student_trains_on_the_vocabulary_losses_alone(tmp_path):
    """A student of another width (here 16 against the teacher's 32) learns from loss_ce and loss_mlm; the
    held-out cosines, undefined across widths, are reported as n/a rather than crashing the evaluation."""
    teacher = _teacher(tmp_path, mlm=True)
    narrow = tmp_path / "narrow.json"
    sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    config = transformers.BertConfig(vocab_size=len(_tokenizer(tmp_path)), max_position_embeddings=64, **sizes)
    config.to_json_file(narrow)
    args = _args(tmp_path, teacher, "narrow", "--max_steps", "4", "--student_config", str(narrow), "--alpha_cos", "0")
    r = fd_train.train(fd_train.resolve_config(args))
    assert r.exit_code == 0 and r.summary["after"]["embedding_cosine"] is None
    assert r.summary["after"]["student_teacher_kl"] > 0
    assert "| held-out embedding cosine to teacher | n/a | n/a |" in (tmp_path / "narrow" / "summary.md").read_text()
    spearman = r.summary["after"]["pairwise_spearman"]  # width-free: defined for the narrower student
    assert spearman is not None and -1 <= spearman <= 1

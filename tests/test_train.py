"""End-to-end tests of python -m fastdistil.train on tiny in-process teachers and a small generated corpus:
training runs and losses fall, checkpoints and the final student are written, the student reloads with
transformers and reproduces the trained model's outputs, fused and reference kernels give the same loss curve,
and bad input gets one clear line with exit code 2 and nothing written."""

import json
import math
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdistil import data as fd_data  # noqa: E402
from fastdistil import job as fd_job  # noqa: E402
from fastdistil import models as fd_models  # noqa: E402
from fastdistil import train as fd_train  # noqa: E402
from fastdistil.objectives import Objective  # noqa: E402

WORDS = (
    "the a of and to in is was for on with as by at from that this it be are were his her they them light "
    "water earth heaven day night god man land sea voice king city house people word spirit life name hand"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer(tmp_path):
    vocab = SPECIAL + WORDS + list("abcdefghijklmnopqrstuvwxyz.,;") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def _corpus(tmp_path, n_lines=120, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 60))) + "." for _ in range(n_lines)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _teacher(tmp_path, mlm=True, layers=4):
    tok = _tokenizer(tmp_path)
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,  # distinct layers: the student starts off the teacher
    )
    model = (transformers.BertForMaskedLM if mlm else transformers.BertModel)(cfg)
    path = tmp_path / ("mlm-teacher" if mlm else "encoder-teacher")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(tmp_path, teacher, out="run", *extra):
    return [
        "--teacher",
        str(teacher),
        "--data",
        str(_corpus(tmp_path)),
        "--dump_path",
        str(tmp_path / out),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--num_proc",
        "1",
        "--max_seq_len",
        "32",
        "--batch_size",
        "8",
        "--eval_fraction",
        "0.1",
        *extra,
    ]


def _metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "eval" not in x]


def test_mlm_teacher_end_to_end(tmp_path):
    teacher = _teacher(tmp_path, mlm=True)
    c = fd_train.resolve_config(
        _args(
            tmp_path,
            teacher,
            "run",
            "--max_steps",
            "24",
            "--checkpoint_interval",
            "10",
            "--learning_rate",
            "3e-3",
            "--student_layers",
            "0,3",
            "--warmup_prop",
            "0.1",
        )
    )
    result = fd_train.train(c)
    assert result.exit_code == 0
    run = tmp_path / "run"
    steps = _metrics(run)
    assert len(steps) == 24
    for key in (
        "loss_ce",
        "loss_mlm",
        "loss_cos",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "samples_per_s",
        "data_wait_s",
        "step_time_s",
        "peak_mem_mb",
    ):
        assert all(key in s and s[key] == s[key] for s in steps), key  # present and not NaN
    assert all(s["loss_mlm"] > 0 and s["loss_ce"] > 0 for s in steps)
    assert all(
        0 <= s["data_wait_s"] < s["step_time_s"] and s["samples_per_s"] > 0 and s["peak_mem_mb"] > 0 for s in steps
    )
    assert all(0 < s["tokens"] <= 8 * 32 for s in steps)  # batch_size 8, max_seq_len 32
    first, last = steps[0], sum(s["loss"] for s in steps[-4:]) / 4
    assert last < 0.8 * first["loss"], (first["loss"], last)
    assert (run / "checkpoints" / "step-10" / "trainer_state.pt").is_file()
    assert (run / "checkpoints" / "step-20" / "model.safetensors").is_file()
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["student_layers"] == [0, 3] and cfg["alpha_ce"] == 5.0 and cfg["teacher_has_mlm_head"] is True
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["student_teacher_kl"] < summary["before"]["student_teacher_kl"]

    loaded = transformers.AutoModelForMaskedLM.from_pretrained(run / "student").eval()
    assert type(loaded).__name__ == "BertForMaskedLM" and loaded.config.num_hidden_layers == 2
    assert (run / "student" / "model.safetensors").is_file() and (run / "student" / "tokenizer.json").is_file()
    ids = torch.randint(5, loaded.config.vocab_size, (2, 9))
    trained = result.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_encoder_teacher_end_to_end(tmp_path, capsys):
    teacher = _teacher(tmp_path, mlm=False)
    result = fd_train.train(
        fd_train.resolve_config(
            _args(tmp_path, teacher, "enc", "--max_steps", "15", "--learning_rate", "3e-3", "--alpha_mse", "1.0")
        )
    )
    assert result.exit_code == 0
    assert "teacher has no MLM head" in capsys.readouterr().out
    steps = _metrics(tmp_path / "enc")
    assert {"loss_cos", "loss_mse"} <= set(steps[0]) and "loss_ce" not in steps[0]
    summary = result.summary
    assert summary["after"]["embedding_cosine"] > summary["before"]["embedding_cosine"]
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "enc" / "student").eval()
    assert type(loaded).__name__ == "BertModel" and loaded.config.num_hidden_layers == 2  # default: every other
    ids = torch.randint(5, loaded.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).last_hidden_state, result.student.eval()(input_ids=ids).last_hidden_state
        )


@pytest.mark.parametrize("mlm", [True, False], ids=["mlm", "encoder"])
def test_fused_and_reference_kernels_give_the_same_loss_curve(tmp_path, mlm):
    teacher = _teacher(tmp_path, mlm=mlm)
    curves = {}
    for kernels in ("fused", "reference"):
        r = fd_train.train(
            fd_train.resolve_config(
                _args(tmp_path, teacher, kernels, "--max_steps", "8", "--kernels", kernels, "--learning_rate", "1e-3")
            )
        )
        assert r.exit_code == 0
        curves[kernels] = _metrics(tmp_path / kernels)
    keys = [k for k in curves["fused"][0] if k.startswith("loss")]
    for a, b in zip(curves["fused"], curves["reference"]):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=2e-3, abs=1e-5), (a["step"], k, a[k], b[k])


def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys):
    mlm_teacher, enc_teacher = _teacher(tmp_path, mlm=True), _teacher(tmp_path, mlm=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the\n")
    capsys.readouterr()  # drop what building the teachers printed
    cases = [
        (["--teacher", str(tmp_path / "nope")], "no such directory"),
        (["--teacher", str(tmp_path)], "not a transformers checkpoint"),
        (["--data", str(empty)], "is empty"),
        (["--data", str(tmp_path / "missing.txt")], "no such file"),
        (["--data", str(tiny)], "yields no sequence"),
        (["--student_layers", "0,9"], "the teacher has layers 0..3"),
        (["--teacher", str(enc_teacher), "--alpha_ce", "5"], "has no MLM head"),
        (["--word_mask", "0.5"], "must sum to 1"),
        (["--max_seq_len", "1000"], "max_seq_len"),
        (["--max_seq_len", "100"], "at most 64 positions"),
        (["--gradient_accumulation_steps", "1000"], "an epoch has only"),
    ]
    for extra, message in cases:
        args = _args(tmp_path, mlm_teacher, "bad", "--max_steps", "1") + extra
        assert fd_train.main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if line.startswith("error:")]  # progress bars aside
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "bad").exists(), extra  # nothing half-written
    # A directory holding another run: refused unless --force; a foreign non-empty directory: always refused.
    assert fd_train.main(_args(tmp_path, mlm_teacher, "ok", "--max_steps", "1")) == 0
    assert fd_train.main(_args(tmp_path, mlm_teacher, "ok", "--max_steps", "1")) == 2
    assert "--force" in capsys.readouterr().err
    assert fd_train.main(_args(tmp_path, mlm_teacher, "ok", "--max_steps", "1", "--force")) == 0
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert fd_train.main(_args(tmp_path, mlm_teacher, "foreign", "--max_steps", "1", "--force")) == 2
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"temperature": 3.0, "batch_size": 4}))
    c = fd_train.resolve_config(["--config", str(cfg), "--batch_size", "6"])
    assert c.temperature == 3.0 and c.batch_size == 6 and c.learning_rate == 5e-4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"temprature": 3.0}))
    with pytest.raises(fd_train.UsageError, match="unknown option"):
        fd_train.resolve_config(["--config", str(bad)])


def test_masking_is_deterministic_and_follows_the_recipe():
    counts = torch.randint(1, 1000, (50,)).numpy()
    masker = fd_data.MLMMasker(counts, special_ids=[0, 1, 2], mask_id=3)
    ids = torch.randint(4, 50, (16, 40))
    ids[:, 0], ids[:, -1] = 1, 2  # special tokens at the ends
    mask = torch.ones_like(ids)
    mask[3, 20:] = 0
    batch = fd_data.Batch(ids, mask)
    a = masker(batch, torch.Generator().manual_seed(5))
    b = masker(batch, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    masked, labels = a
    chosen = labels != -100
    assert chosen.sum().item() == -(-int(mask.sum()) * 15 // 100)  # ceil(15% of the real tokens)
    assert not chosen[:, 0].any() and not chosen[:, -1].any() and not chosen[3, 20:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert (masked[chosen] == 3).float().mean().item() > 0.6  # ~80% [MASK]


def test_default_student_layers():
    assert fd_models.default_student_layers(12) == [0, 2, 4, 7, 9, 11]
    assert fd_models.default_student_layers(6, 3) == [0, 2, 5]
    assert fd_models.default_student_layers(4) == [0, 3]


def test_length_grouped_batches_cover_every_index_once():
    lengths = torch.randint(5, 100, (1000,)).numpy()
    idx = torch.arange(0, 1000, 2).numpy()
    batches = fd_data.length_grouped_batches(lengths, idx, 16, seed=1, epoch=0)
    flat = sorted(int(i) for b in batches for i in b)
    assert flat == sorted(idx.tolist())
    spread = sum(lengths[b].max() - lengths[b].min() for b in batches) / len(batches)
    assert spread < 20  # grouped by length (random batches would spread ~90)
    assert [list(b) for b in batches] == [list(b) for b in fd_data.length_grouped_batches(lengths, idx, 16, 1, 0)]


def _interrupt_on_call(monkeypatch, n):
    """The n-th call of the training objective raises KeyboardInterrupt: a Ctrl-C in the middle of a step."""
    calls = {"n": 0}
    real_call = Objective.__call__

    def call(self, *args):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_call(self, *args)

    monkeypatch.setattr(Objective, "__call__", call)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, monkeypatch):
    teacher = _teacher(tmp_path, mlm=True)
    _interrupt_on_call(monkeypatch, 3)
    result = fd_train.train(fd_train.resolve_config(_args(tmp_path, teacher, "int", "--max_steps", "10")))
    assert result.exit_code == 130
    ckpt = tmp_path / "int" / "checkpoints" / "step-2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
    assert transformers.AutoModelForMaskedLM.from_pretrained(ckpt) is not None


def test_bf16_autocast_run(tmp_path):
    teacher = _teacher(tmp_path, mlm=True)
    result = fd_train.train(
        fd_train.resolve_config(_args(tmp_path, teacher, "bf16", "--max_steps", "3", "--precision", "bf16"))
    )
    assert result.exit_code == 0
    steps = _metrics(tmp_path / "bf16")
    assert len(steps) == 3 and all(s["loss"] == s["loss"] and s["loss"] > 0 for s in steps)


def test_model_mismatches_are_clear_errors(tmp_path, capsys):
    teacher = _teacher(tmp_path, mlm=True)
    no_tok = tmp_path / "no-tokenizer"
    transformers.AutoModelForMaskedLM.from_pretrained(teacher).save_pretrained(no_tok)
    other_vocab = tmp_path / "student.json"
    cfg = transformers.BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    cfg.to_json_file(other_vocab)
    capsys.readouterr()
    for extra, message in [
        (["--teacher", str(no_tok)], "no usable tokenizer"),
        (["--student_config", str(other_vocab)], "must share the tokenizer"),
    ]:
        assert fd_train.main(_args(tmp_path, teacher, "bad", "--max_steps", "1") + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")  # in the [test] extra
    teacher = _teacher(tmp_path, mlm=False)
    c = fd_train.resolve_config(_args(tmp_path, teacher, "tb", "--max_steps", "3", "--tensorboard"))
    assert fd_train.train(c).exit_code == 0
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_fastdistil_attention_inside_teacher_and_student(tmp_path, capsys):
    """--attention fastdistil_varlen: both models run the op on the unpadded tokens (with dropout in the student),
    the run converges like one on transformers' sdpa, and the saved student is a plain transformers checkpoint."""
    teacher = _teacher(tmp_path)
    runs = {}
    for attention in ("fastdistil_varlen", "sdpa"):
        r = fd_train.train(
            fd_train.resolve_config(_args(tmp_path, teacher, attention, "--max_steps", "6", "--attention", attention))
        )
        assert r.exit_code == 0
        runs[attention] = _metrics(tmp_path / attention)
    assert "attention=fastdistil_varlen" in capsys.readouterr().out
    ours, theirs = runs["fastdistil_varlen"][-1], runs["sdpa"][-1]
    assert all(math.isfinite(v) for k, v in ours.items() if k.startswith("loss"))
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=0.1)  # dropout masks differ; the run does not
    config = (tmp_path / "fastdistil_varlen" / "student" / "config.json").read_text()
    assert "fastdistil" not in config


def test_vocabulary_sequences_are_whole_words_train_only_and_the_builtin_corpus_default(tmp_path, capsys):
    tok = _tokenizer(tmp_path)
    rows = fd_data.vocabulary_sequences(tok, 50, np.array([6, 20]), seed=3)["input_ids"]
    assert len(rows) == 50 and {len(r) for r in rows} <= {6, 20}
    vocab = {i: t for t, i in tok.get_vocab().items()}
    for r in rows:
        assert r[0] == tok.cls_token_id and r[-1] == tok.sep_token_id
        assert all(vocab[i].isalpha() and not vocab[i].startswith("##") and i not in tok.all_special_ids
                   for i in r[1:-1])  # fmt: skip
    assert rows == fd_data.vocabulary_sequences(tok, 50, np.array([6, 20]), seed=3)["input_ids"]
    teacher = _teacher(tmp_path, mlm=False)
    plain = json.loads(_run_config(tmp_path, teacher, "plain"))
    assert "vocabulary sequences" not in capsys.readouterr().out
    mixed = json.loads(_run_config(tmp_path, teacher, "mixed", "--vocab_fraction", "0.5"))
    n_vocab = mixed["train_sequences"] - plain["train_sequences"]
    assert f"{mixed['train_sequences']} training ({n_vocab} of them vocabulary sequences" in capsys.readouterr().out
    assert mixed["eval_sequences"] == plain["eval_sequences"]  # the held-out split is the corpus' own text
    assert mixed["train_sequences"] == plain["train_sequences"] + round(0.5 * plain["train_sequences"])
    assert plain["vocab_fraction"] == 0.0  # the user's own corpus trains on itself by default
    builtin = fd_train.resolve_config([])
    assert fd_job.with_data_defaults(builtin, texts_given=False).vocab_fraction == fd_job.BUILTIN_CORPUS_VOCAB_FRACTION
    assert fd_job.with_data_defaults(builtin, texts_given=True).vocab_fraction == 0.0
    given = fd_train.resolve_config(["--vocab_fraction", "0.25"])
    assert fd_job.with_data_defaults(given, texts_given=False).vocab_fraction == 0.25


def _run_config(tmp_path, teacher, name, *extra):
    c = fd_train.resolve_config(_args(tmp_path, teacher, name, "--max_steps", "1", *extra))
    assert fd_train.train(c).exit_code == 0
    return (tmp_path / name / "train_config.json").read_text()

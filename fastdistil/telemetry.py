"""What the trainer reports while it runs: metrics.jsonl (every step, every skipped step, mid-run evaluations),
TensorBoard (optional), a progress bar on a terminal and a plain line every 5% without one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fastdistil.fileio import atomic_write


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines of steps after `step` (written after the checkpoint a resumed run continues from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", record.get("skipped_step", 0)) <= step:
            kept.append(line)
    atomic_write(path, "".join(x + "\n" for x in kept))  # the history survives a crash here


class StepLog:
    """The per-step outputs of one process: files on the first process only, nothing elsewhere."""

    def __init__(self, out: Path, *, main: bool, total_steps: int, first_step: int, tensorboard: bool, log_interval):
        from tqdm.auto import tqdm

        self.main, self.total, self.log_interval = main, total_steps, log_interval
        self.file = open(out / "metrics.jsonl", "a", buffering=1) if main else open(os.devnull, "w")
        self.board = None
        if tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"), purge_step=first_step + 1)
        self.bar = tqdm(total=total_steps, initial=first_step, desc="distilling", unit="step", dynamic_ncols=True,
                        disable=None if main else True)  # fmt: skip
        self.plain_every = max(1, total_steps // 20)  # without a terminal (logs, CI) tqdm is off: a line every 5%

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def step(self, record: dict, terms: dict) -> None:
        """One completed optimizer step: the file, TensorBoard, the bar or a plain line."""
        self.write(record)
        step = record["step"]
        if self.board is not None:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self.board.add_scalar(f"train/{key}", value, step)
        if step % self.log_interval == 0 or step == self.total:
            postfix = {"tok/s": f"{record['tokens_per_s']:.0f}", "loss": f"{record['loss']:.4f}"}
            self.bar.set_postfix({**postfix, **{k[5:]: f"{v:.4f}" for k, v in terms.items()}}, refresh=False)
        self.bar.update(1)
        if self.main and self.bar.disable and (step % self.plain_every == 0 or step == self.total):
            listed = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
            print(f"step {step}/{self.total} loss={record['loss']:.4f} {listed} "
                  f"tokens/s={record['tokens_per_s']:.0f}", flush=True)  # fmt: skip

    def skipped(self, step: int, bad_terms: list, in_a_row: int) -> None:
        bad = sorted(set(bad_terms))
        self.write({"skipped_step": step, "bad_terms": bad, "bad_steps_in_a_row": in_a_row})
        if self.main:
            print(f"warning: step {step} skipped: non-finite {', '.join(bad)}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.board is not None:
            self.board.close()

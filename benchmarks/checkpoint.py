"""Checkpoint save/load time, resume cost, and how long training waits for saves, synchronous or async.

    python benchmarks/checkpoint.py            # median of 5, one thread

Model: ~25M parameters (4 x Linear(2500, 2500)) with AdamW state after one step, ~300 MB in all.
  - torch.save of {model, optimizer} state dicts + fsync; torch.load(weights_only=True)
  - safetensors.save_file of the same tensors + fsync; safetensors.load_file
  - paperloop save_checkpoint (safetensors + JSON, sha256 manifest, fsync, atomic rename) and
    load_checkpoint (verify every file's sha256, then load weights, optimizer, RNG, ...)
Resume cost: time from a saved data position to the first batch, at offset 10 and 100,000 of a
1,000,000-sample in-memory dataset (it must not grow with the offset).
Training waits: wall time of a 99-step fit() of the same model (batches of 64) with no saves, with a synchronous
save every 20 steps, and with an async one (`async_checkpoint=True`) every 20 steps (4 saves; the last has 19
steps to land before fit() returns), the three interleaved; "training waits" is a run's time minus the no-save
run's. An async save costs training the copy to CPU memory (and the pruning of an old checkpoint, as a
synchronous one does); its write overlaps the steps when a core is free for the writer thread.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from paperloop import BaseTrainer, TrainerConfig
from paperloop.callbacks import ModelCheckpoint
from paperloop.plans import EpochPlan, fetch


class Regress(BaseTrainer):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x), y)


def fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def flat_tensors(model, optimizer):
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for pid, s in optimizer.state_dict()["state"].items():
        flat.update({f"opt.{pid}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return flat


def big_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(2500, 2500) for _ in range(4)])


def timed_fit(out: Path, saves: str, every: int, steps: int, batch: int) -> float:
    """Seconds of one fit() of `steps` steps with `saves` ("none", "sync" or "async") every `every` steps."""
    data = TensorDataset(torch.randn(batch, 2500), torch.randn(batch, 2500))
    callbacks = [] if saves == "none" else [ModelCheckpoint(every_n_steps=every, every_n_epochs=None,
                                                            save_last=False, keep_last=1)]
    cfg = TrainerConfig(max_steps=steps, batch_size=batch, output_dir=str(out), async_checkpoint=saves == "async")
    t = Regress(big_model(), cfg, train_data=data, callbacks=callbacks)
    start = time.perf_counter()
    t.fit()
    return time.perf_counter() - start


def training_waits(tmp: Path, repeats: int, every: int = 20, saves: int = 4, batch: int = 64) -> None:
    steps = every * (saves + 1) - 1  # no save at the last step: its write would have no training to overlap
    modes = ("none", "sync", "async")
    times = {mode: [] for mode in modes}
    timed_fit(tmp / "warmup", "async", every, every + 1, batch)
    for i in range(repeats):  # interleaved: disk and machine noise hit every mode alike
        for mode in modes:
            times[mode].append(timed_fit(tmp / f"{mode}-{i}", mode, every, steps, batch))
            shutil.rmtree(tmp / f"{mode}-{i}")
    run = {mode: statistics.median(t) for mode, t in times.items()}
    waits = {mode: run[mode] - run["none"] for mode in modes}
    print(f"\ntraining waits for saves: {steps}-step fit() of the same model, batches of {batch}, a save every {every} "
          f"steps ({saves} saves), 1 thread, median of {repeats}")
    print("| saves                    | run s  | training waits s | per save s |")
    print("|--------------------------|--------|------------------|------------|")
    for mode, label in zip(modes, ("none", f"synchronous, every {every}", f"async, every {every}")):
        wait = "" if mode == "none" else f"{waits[mode]:16.3f}"
        per = "" if mode == "none" else f"{waits[mode] / saves:10.3f}"
        print(f"| {label:24s} | {run[mode]:6.2f} | {wait:>16s} | {per:>10s} |")
    print(f"async / sync training waits: {waits['async'] / waits['sync']:.2f}x (goal: at most 0.2x)")


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(repeats: int = 5):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2500, 2500) for _ in range(4)])
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        data = TensorDataset(torch.randn(8, 2500), torch.randn(8, 2500))
        t = Regress(model, TrainerConfig(max_steps=1, batch_size=8, output_dir=str(tmp / "run")), train_data=data)
        t.fit()  # one step, so AdamW holds its moments
        state = {"model": model.state_dict(), "optimizer": t.optimizer.state_dict()}
        flat = flat_tensors(model, t.optimizer)
        counter = iter(range(10**6))

        def torch_save():
            path = tmp / f"t{next(counter)}.pt"
            torch.save(state, path)
            fsync(path)
            return path

        def st_save():
            path = tmp / f"s{next(counter)}.safetensors"
            save_file(flat, str(path))
            fsync(path)
            return path

        pt, st, ours = torch_save(), st_save(), t.save_checkpoint(tmp / "ours-probe")
        methods = {  # label: (save, load)
            "torch.save + fsync / torch.load(weights_only=True)": (torch_save, lambda: torch.load(pt, weights_only=True)),
            "safetensors save_file + fsync / load_file": (st_save, lambda: load_file(str(st))),
            "paperloop save_checkpoint / load_checkpoint (sha256 verified)":
                (lambda: t.save_checkpoint(tmp / f"ours{next(counter)}"), lambda: t.load_checkpoint(ours)),
        }
        times = {label: ([], []) for label in methods}
        for _ in range(repeats):  # interleaved: disk and machine noise hit every method alike
            for label, fns in methods.items():
                for fn, out in zip(fns, times[label]):
                    start = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - start)
        rows = [(label, statistics.median(s), statistics.median(lo)) for label, (s, lo) in times.items()]
    size_mb = sum(v.numel() * v.element_size() for v in flat.values()) / 2**20
    print(f"\n{params / 1e6:.1f}M parameters + AdamW state ({size_mb:.0f} MB), 1 thread, median of {repeats}")
    print(f"| {'method':62s} | save s | load s | save+load s |")
    print(f"|{'-' * 64}|--------|--------|-------------|")
    for label, save_s, load_s in rows:
        print(f"| {label:62s} | {save_s:6.3f} | {load_s:6.3f} | {save_s + load_s:11.3f} |")

    n = 1_000_000
    big = TensorDataset(torch.randn(n, 8), torch.randn(n, 1))

    def first_batch_at(offset):
        plan = EpochPlan(n, batch_size=32, seed=0)
        plan.load_state_dict({"seed": 0, "epoch": 3, "offset": offset, **plan.shape()})
        return fetch(big, next(plan.steps()).micro_batches[0])

    print(f"\nresume: saved data position -> first batch, {n:,}-sample dataset, batches of 32, median of {repeats}")
    print("| offset (steps) | seconds |")
    print("|----------------|---------|")
    for offset in (1, 3_125, 31_000):
        print(f"| {offset:>14,} | {median_time(lambda: first_batch_at(offset), repeats):7.4f} |")

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        training_waits(Path(tmp), repeats)


if __name__ == "__main__":
    main()

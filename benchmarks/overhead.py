"""Per-step overhead of paperloop's BaseTrainer against hand-written loops and peer frameworks.

    python benchmarks/overhead.py                 # both workloads, median of 5 interleaved runs
    python benchmarks/overhead.py --repeats 3 --workloads tiny

One intra-op thread. Workloads: "tiny" (MLP 32->64->10, batch 32, Adam, 3000 steps: per-step framework
cost dominates) and "compute" (MLP 512->2048->512, batch 256, 300 steps: the math dominates).
Contenders, each timed over the whole training run including setup: a loop over pre-batched tensors,
a loop over a shuffled DataLoader, BaseTrainer with TensorBoardLogger and ProgressBar, and where
installed (`pip install -e ".[bench]"`) Lightning (bare, and with its default logger and progress bar)
and the transformers Trainer. Prints steps/s and the ratio to the DataLoader loop, by wall time and by this
process's CPU time (`time.process_time`): on a shared machine other jobs stretch the wall time of whichever
contender they overlap, while the CPU time a contender spends is its own, so the two ratios agreeing says the
machine's noise did not decide the row. `--only` runs a subset (the DataLoader loop, the baseline, always runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from paperloop import BaseTrainer, TrainerConfig
from paperloop.callbacks import ProgressBar, TensorBoardLogger

WORKLOADS = {"tiny": dict(sizes=(32, 64, 10), batch=32, steps=3000),
             "compute": dict(sizes=(512, 2048, 512), batch=256, steps=300)}


def make_model(sizes):
    torch.manual_seed(0)
    d_in, d_hidden, d_out = sizes
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.ReLU(), torch.nn.Linear(d_hidden, d_out))


def make_data(sizes, batch, steps):
    n = batch * min(steps, 100)  # several epochs, so epoch boundaries are part of the cost
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, sizes[0], generator=g), torch.randint(0, sizes[2], (n,), generator=g))


def run_prebatched(sizes, batch, steps, data):
    model = make_model(sizes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.tensors
    batches = list(zip(x.split(batch), y.split(batch)))
    for step in range(steps):
        xb, yb = batches[step % len(batches)]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run_dataloader(sizes, batch, steps, data):
    model = make_model(sizes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    step = 0
    while step < steps:
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break


class Classify(BaseTrainer):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)


def run_paperloop(sizes, batch, steps, data):
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainerConfig(max_epochs=10**6, max_steps=steps, batch_size=batch, output_dir=out, log_every_steps=50)
        Classify(make_model(sizes), cfg, train_data=data, callbacks=[TensorBoardLogger(), ProgressBar()]).fit()


def lightning_runner(default_logger: bool):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, sizes):
            super().__init__()
            self.model = make_model(sizes)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def run(sizes, batch, steps, data):
        with tempfile.TemporaryDirectory() as out:
            trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=default_logger,
                                enable_progress_bar=default_logger, enable_checkpointing=False,
                                enable_model_summary=False, default_root_dir=out, log_every_n_steps=50)
            trainer.fit(Module(sizes), DataLoader(data, batch_size=batch, shuffle=True))

    return run


def run_hf_trainer(sizes, batch, steps, data):
    from transformers import Trainer, TrainingArguments

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = make_model(sizes)

        def forward(self, x, labels):
            return {"loss": F.cross_entropy(self.model(x), labels)}

    rows = [{"x": x, "labels": y} for x, y in zip(*data.tensors)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
                                 lr_scheduler_type="constant", report_to="none", save_strategy="no",
                                 logging_steps=50, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                                 optim="adamw_torch", weight_decay=0.0)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every log line
            Trainer(model=WithLoss(), args=args, train_dataset=rows).train()


BASELINE = "loop, shuffled DataLoader"


def contenders() -> dict:
    found = {"loop, pre-batched tensors": run_prebatched, "loop, shuffled DataLoader": run_dataloader,
             "paperloop BaseTrainer + TensorBoard + ProgressBar": run_paperloop}
    try:
        import lightning  # noqa: F401

        found["Lightning, no logger/bar"] = lightning_runner(False)
        found["Lightning, default logger + bar"] = lightning_runner(True)
    except ImportError:
        print("(lightning not installed: pip install -e '.[bench]' to include it)")
    found["transformers Trainer"] = run_hf_trainer
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--only", nargs="+", metavar="WORD", help="contenders whose name holds one of these words")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    for name in args.workloads:
        w = WORKLOADS[name]
        data = make_data(w["sizes"], w["batch"], w["steps"])
        runs = {label: fn for label, fn in contenders().items() if label == BASELINE or not args.only
                or any(word.lower() in label.lower() for word in args.only)}
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved: machine noise hits every contender alike
            for label, fn in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(w["sizes"], w["batch"], w["steps"], data)
                wall[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
        base, base_cpu = statistics.median(wall[BASELINE]), statistics.median(cpu[BASELINE])
        print(f"\n{name}: MLP {'->'.join(map(str, w['sizes']))}, batch {w['batch']}, {w['steps']} steps, "
              f"1 thread, median of {args.repeats}")
        print(f"| {'contender':52s} | steps/s | vs DataLoader loop | steps/CPU-s | vs DataLoader loop, CPU | "
              "wall / CPU |")
        print(f"|{'-' * 54}|---------|--------------------|-------------|-------------------------|------------|")
        for label in runs:
            med, med_cpu = statistics.median(wall[label]), statistics.median(cpu[label])
            print(f"| {label:52s} | {w['steps'] / med:7.1f} | {base / med:17.2f}x | {w['steps'] / med_cpu:11.1f} | "
                  f"{base_cpu / med_cpu:22.2f}x | {med / med_cpu:9.2f}x |")


if __name__ == "__main__":
    main()

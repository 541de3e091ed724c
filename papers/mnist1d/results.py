"""What the MNIST-1D command keeps on disk: a record per row, and the merged results table.

    <output_dir>/<row>/row.json   {"settings", "seconds", "result"}: the row's settings, its training
                                  time summed over every invocation, and its result once finished
    <output_dir>/results.json     {"paper", "settings", "torch", "rows"}: every finished row so far
    <output_dir>/results.md       the table, paper vs ours;  results.png: the same as bars

A row's result is reused when the same command runs again. Everything in one output folder ran with
the same settings (every config key but the row selection, the output folder and the log cadence):
a command with other settings is refused before it trains anything, so a table never mixes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from paperloop import ConfigError

PAPER = 'Greydanus, "Scaling Down Deep Learning" (2020), MNIST-1D benchmark table'
# Test accuracy (%) in the paper's table: (model, shuffled) -> accuracy. Its order is the table's.
PAPER_TEST_ACC = {("logistic", False): 32.0, ("logistic", True): 32.0, ("mlp", False): 68.0, ("mlp", True): 68.0,
                  ("cnn", False): 94.0, ("cnn", True): 56.0, ("gru", False): 91.0, ("gru", True): 57.0}
RECORD = "row.json"
# Keys that choose which rows run, where, and how often they log: they change no result.
NOT_SETTINGS = ("models", "shuffled", "output_dir", "log_every_steps", "time_limit_s")


def settings(cfg) -> dict:
    """The config as JSON, less the keys that change no result."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SETTINGS}))


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"output_dir: {path} is not valid JSON; delete it to start that part afresh") from None


def read_record(row_dir: Path, current: dict) -> dict | None:
    """The row's record, or None when it never ran; ConfigError when it ran with other settings."""
    record = _read_json(row_dir / RECORD)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("settings") != current:
        raise ConfigError(f"output_dir: {row_dir} ran with other settings ({_differences(record, current)}); "
                          f"choose another output_dir, or delete {row_dir} to train that row afresh")
    return record


def write_record(row_dir: Path, current: dict, seconds: float, result: dict | None) -> None:
    row_dir.mkdir(parents=True, exist_ok=True)
    _write_json(row_dir / RECORD, {"settings": current, "seconds": seconds, "result": result})


def earlier_rows(out: Path, current: dict) -> list[dict]:
    """The rows results.json holds from earlier commands; ConfigError when they ran with other settings."""
    results = _read_json(out / "results.json")
    if results is None:
        return []
    if not isinstance(results, dict) or results.get("settings") != current:
        raise ConfigError(f"output_dir: {out / 'results.json'} holds rows run with other settings "
                          f"({_differences(results, current)}); choose another output_dir, or move those results away")
    return results["rows"]


def _differences(recorded, current: dict) -> str:
    theirs = recorded.get("settings") if isinstance(recorded, dict) else None
    if not isinstance(theirs, dict):
        return "not recorded there"
    keys = sorted(k for k in theirs.keys() | current.keys() if theirs.get(k) != current.get(k))
    return ", ".join(f"{k}: {theirs.get(k)!r} there, {current.get(k)!r} now" for k in keys)


def merge(earlier: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows with this command's rows in place of theirs, in the paper's table order."""
    by_row = {(r["model"], r["shuffled"]): r for r in earlier + new}
    order = list(PAPER_TEST_ACC)
    return sorted(by_row.values(), key=lambda r: order.index((r["model"], r["shuffled"])))


def write_results(out: Path, current: dict, rows: list[dict], torch_version: str) -> None:
    _write_json(out / "results.json", {"paper": PAPER, "settings": current, "torch": torch_version, "rows": rows})
    (out / "results.md").write_text(results_table(rows, current, torch_version))
    plot_results(rows, out / "results.png")


def results_table(rows: list[dict], current: dict, torch_version: str) -> str:
    length = f"{current['max_steps']} steps" if current["max_steps"] else f"{current['max_epochs']} epochs"
    lines = [f"# {PAPER}", "", f"{length} a row, batch {current['batch_size']}, lr {current['lr']}, "
             f"{current['threads']} intra-op thread(s), torch {torch_version}.", "",
             "| model | data | paper test acc | ours | difference | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'shuffled' if r['shuffled'] else 'original'} | {r['paper_test_acc']:.0f}% "
                     f"| {r['test_acc']:.1f}% | {r['test_acc'] - r['paper_test_acc']:+.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{'shuffled' if r['shuffled'] else 'original'}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    ax.bar([x - 0.2 for x in xs], [r["paper_test_acc"] for r in rows], width=0.4, label="paper")
    ax.bar([x + 0.2 for x in xs], [r["test_acc"] for r in rows], width=0.4, label="paperloop")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("MNIST-1D: paper vs paperloop")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Before and after: a benchmark of this tree against the same benchmark run on another commit's paperloop,
interleaved in one run (these machines are shared and noisy: a number from another day is no baseline).

    python benchmarks/ab.py --base 69d3c42 --rounds 3 grpo -- --only ours hand dynamic --repeats 1
    python benchmarks/ab.py --base 69d3c42 --rounds 3 multiturn -- --repeats 3

The base commit's package is built into a temporary folder (`pip install --no-deps --target`) and put first on
PYTHONPATH; this tree's benchmark script runs against each in turn (the order alternating round by round), so the
measuring code is the same and only paperloop differs. Each run's table is compared through the ratio to the
benchmark's own hand-written contender, measured in the same run:
- grpo: the hand loop's CPU-s per step / ours (per trainer and beta; higher is faster);
- multiturn: `generate()` re-reading the transcript / `TurnSampler`, over the whole episode.
The table gives each ratio's median over rounds, base beside this tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grpo_ratios(rows: list[dict]) -> dict[str, float]:
    """{"<trainer> (beta b)": hand CPU-s / this trainer's}, each round's medians (rows) pooled by median."""
    by = {}
    for row in rows:
        by.setdefault((row["trainer"], row["beta"]), []).append(row["step_cpu"])
    ratios = {}
    for (trainer, beta), cpus in by.items():
        if trainer != "hand-written loop" and ("hand-written loop", beta) in by:
            ratios[f"{trainer} (beta {beta:g})"] = statistics.median(by[("hand-written loop", beta)]) / \
                statistics.median(cpus)
    return ratios


def multiturn_ratios(medians: dict[str, list[float]]) -> dict[str, float]:
    return {"generate() re-reading / TurnSampler, whole episode": sum(medians["generate() re-reading"])
            / sum(medians["TurnSampler (cache carried)"])}


RATIOS = {"grpo": grpo_ratios, "multiturn": multiturn_ratios}


def build_base(commit: str, folder: Path) -> Path:
    """The paperloop package of `commit`, installed into folder/pkg (no dependencies: this venv's serve)."""
    source = folder / "src"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(source), commit], check=True,
                   capture_output=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(folder / "pkg"), str(source)], check=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(source)], capture_output=True)
    return folder / "pkg"


def run(script: str, args: list[str], pythonpath: Path | None, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--json", str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{script} failed ({'base' if pythonpath else 'this tree'}):\n{proc.stderr[-3000:]}")
    return RATIOS[script](json.loads(out.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare against (e.g. main before a change)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("script", choices=sorted(RATIOS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="after --: the benchmark's own arguments")
    a = p.parse_args()
    args = [x for x in a.args if x != "--"]
    results: dict[str, dict[str, list[float]]] = {"base": {}, "this tree": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(a.base, Path(tmp))
        for round_ in range(a.rounds):
            order = [("base", base), ("this tree", None)]
            for label, path in order if round_ % 2 == 0 else order[::-1]:
                for key, value in run(a.script, args, path, Path(tmp) / "out.json").items():
                    results[label].setdefault(key, []).append(value)
            print(f"round {round_ + 1}/{a.rounds} done", flush=True)
    print(f"\n{a.script} {' '.join(args)}: ratio to the hand-written contender (higher is faster), median of "
          f"{a.rounds} interleaved rounds\n")
    print(f"| contender | base {a.base} | this tree | this / base |")
    print("|---|---|---|---|")
    for key in results["base"]:
        before, after = statistics.median(results["base"][key]), statistics.median(results["this tree"][key])
        print(f"| {key} | {before:.2f}x | {after:.2f}x | {after / before:.2f} |")


if __name__ == "__main__":
    main()

"""One import package: `paperloop`. A user's own trainer.py, models.py, callbacks.py or papers/ (among the
commonest names in research repos) never shadows ours, and nothing is installed under those names."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

DECOY = "raise ImportError('the user\\'s own {name} was imported instead of paperloop\\'s')\n"

USER_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from torch.utils.data import TensorDataset
    from paperloop import BaseTrainer, TrainerConfig, TrainState, load_config, ConfigError, CheckpointError
    from paperloop.callbacks import EarlyStopping, ModelCheckpoint, TensorBoardLogger
    from paperloop.models import build_classifier
    import models, trainer  # the user's own files, next to the script

    class Regression(BaseTrainer):
        def training_step(self, batch):
            x, y = batch
            return F.mse_loss(self.model(x), y)

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    model = torch.nn.Linear(4, 1)
    t = Regression(model, TrainerConfig(max_epochs=3, batch_size=16, lr=0.05, output_dir="run"),
                   train_data=TensorDataset(x, x.sum(1, keepdim=True)))
    state = t.fit()
    print(models.MINE, trainer.MINE, state.global_step, state.train_loss_history[-1] < state.train_loss_history[0])
""")


def user_folder(tmp_path: Path) -> Path:
    for name in ("callbacks", "papers/__init__"):
        (tmp_path / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{name}.py").write_text(DECOY.format(name=name))
    for name in ("trainer", "models"):  # imported on purpose by the script: they must be the user's
        (tmp_path / f"{name}.py").write_text(f"MINE = 'user {name}'\n")
    return tmp_path


def test_a_user_script_beside_its_own_trainer_and_models_files_trains(tmp_path):
    folder = user_folder(tmp_path)
    (folder / "train.py").write_text(USER_SCRIPT)
    proc = subprocess.run([sys.executable, "train.py"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["user", "models", "user", "trainer", "12", "True"]


def test_paperloop_run_works_from_a_folder_with_shadowing_names(tmp_path):
    folder = user_folder(tmp_path)
    for i, command in enumerate(([str(Path(sys.executable).with_name("paperloop"))],
                                 [sys.executable, "-m", "paperloop.cli"])):
        out = folder / f"out{i}"
        proc = subprocess.run([*command, "run", "mnist1d", "max_steps=20", "val_every_steps=10", "models=[logistic]",
                               "shuffled=[false]", f"output_dir={out}"], cwd=folder, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "results.json").read_text())["rows"][0]["steps"] == 20


def test_no_module_is_installed_under_the_folder_names(tmp_path):
    probe = "import importlib.util as u; print([n for n in ('trainer', 'callbacks', 'models', 'papers') if u.find_spec(n)])"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr

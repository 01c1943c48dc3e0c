"""A tiny resumable training run, driven by test_resume.py in a subprocess.

usage: python _fit_worker.py OUT_DIR SECONDS_PER_STEP
Trains a small DeepSets classifier with omnijet_lib.training.fit (6 epochs x 8 steps), resuming
from OUT_DIR/last.ckpt when present; writes OUT_DIR/model.safetensors and OUT_DIR/run.json
({"steps_run": steps executed by this process, "global_step": ...}).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from omnijet_lib.models.deepsets import DeepSets, DeepSetsConfig
from omnijet_lib.training import TrainConfig
from omnijet_lib.training.batching import PaddedDataset, make_loader
from omnijet_lib.training.classifier import ClassifierModule
from omnijet_lib.io import save_model
from omnijet_lib.training.fit import fit

EPOCHS, N_JETS, BATCH = 6, 256, 32


class CountingModule(ClassifierModule):
    steps_run = 0
    seconds_per_step = 0.0

    def training_step(self, batch, i):
        CountingModule.steps_run += 1
        time.sleep(self.seconds_per_step)  # makes the first run slow enough to be killed part way
        return super().training_step(batch, i)


def main(out_dir: Path, seconds_per_step: float) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 16, N_JETS)
    mask = np.arange(16)[None] < lengths[:, None]
    labels = rng.integers(0, 2, N_JETS)
    x = (rng.normal(size=(N_JETS, 16, 3)) + labels[:, None, None]).astype(np.float32)
    x[~mask] = 0
    loader = make_loader(PaddedDataset(x, mask, label=labels), BATCH, shuffle=True, seed=0)
    torch.manual_seed(0)
    module = CountingModule(DeepSets(DeepSetsConfig(n_classes=2, phi=[16, 16], f=[16])))
    module.seconds_per_step = seconds_per_step
    fit(module, loader, out_dir=out_dir, config=TrainConfig(max_epochs=EPOCHS, seed=0, progress_bar=False))
    save_model(out_dir / "model.safetensors", module.model)
    (out_dir / "run.json").write_text(json.dumps(
        {"steps_run": CountingModule.steps_run, "global_step": module.trainer_.global_step}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]))

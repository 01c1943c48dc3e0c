import numpy as np
import torch

from omnijet_lib.models.deepsets import DeepSets, DeepSetsConfig
from omnijet_lib.training import TrainConfig
from omnijet_lib.training.classifier import predict_proba, split_indices, train_classifier


def _toy(n=400, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 20, n)
    mask = np.arange(20)[None, :] < lengths[:, None]
    labels = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 20, 3)).astype(np.float32)
    x[..., 0] += labels[:, None] * 3.0              # class 1: much harder constituents
    x[~mask] = 0
    return x, mask, labels


def test_deepsets_ignores_padding():
    model = DeepSets(DeepSetsConfig(n_classes=2))
    x, mask, _ = _toy(8)
    y1 = model(torch.tensor(x), torch.tensor(mask))
    x2 = x.copy()
    x2[~mask] = 123.0
    y2 = model(torch.tensor(x2), torch.tensor(mask))
    assert torch.allclose(y1, y2)


def test_training_learns_and_predict_keeps_order(tmp_path):
    x, mask, labels = _toy()
    tr, va, te = split_indices(len(x), seed=1)
    assert len(set(tr) | set(va) | set(te)) == len(x)
    model = train_classifier(DeepSets(DeepSetsConfig(n_classes=2, phi=[32, 32], f=[32])),
                             x[tr], mask[tr], labels[tr], val=(x[va], mask[va], labels[va]),
                             out_dir=tmp_path, train_config=TrainConfig(max_epochs=8, progress_bar=False))
    p = predict_proba(model, x[te], mask[te], batch_size=16)
    acc = (p.argmax(1) == labels[te]).mean()
    assert acc > 0.8
    assert (tmp_path / "last.ckpt").is_file()

"""The shipped digits classifier: a small CNN whose penultimate layer is the digits-FID feature space.

Owns ``DigitsClassifier`` (architecture), ``load_classifier`` (the shipped weights in
``dice_ds/assets/digits_classifier.pt``, made by ``scripts/train_digits_classifier.py``) and the
batched feature/label extraction used by ``dice_ds.eval.metrics``. Inputs are grayscale
[N, 1, 16, 16] images in [-1, 1] (``dice_ds.data`` conventions); nothing here starts a process group.

Shape legend: N images, F feature dim (``FEATURE_DIM``), K classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dice_ds.data import DIGITS_SIZE, NUM_CLASSES

FEATURE_DIM = 64
ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_PATH = ASSETS / "digits_classifier.pt"


class DigitsClassifier(nn.Module):
    """conv32-conv32-pool-conv64-pool -> Linear(1024, 64) features -> Linear(64, 10) logits."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (DIGITS_SIZE // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x_N1HW: torch.Tensor) -> torch.Tensor:
        return self.body(x_N1HW)

    def forward(self, x_N1HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_N1HW))


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped classifier (or the one at ``path``), in eval mode on CPU."""
    path = Path(path) if path is not None else CLASSIFIER_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier not found at {path}: run scripts/train_digits_classifier.py "
            f"or pass --classifier PATH")
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def classify(model: DigitsClassifier, x_N1HW: torch.Tensor, batch: int = 512
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, F] float64, predicted labels [N]) for images in [-1, 1] of the shipped size."""
    if tuple(x_N1HW.shape[1:]) != (1, DIGITS_SIZE, DIGITS_SIZE):
        raise ValueError(f"the digits classifier takes [N, 1, {DIGITS_SIZE}, {DIGITS_SIZE}] images, "
                         f"got {list(x_N1HW.shape)}")
    feats, preds = [], []
    for chunk in x_N1HW.split(batch):
        f_NF = model.features(chunk.float())
        feats.append(f_NF.double())
        preds.append(model.head(f_NF).argmax(-1))
    return torch.cat(feats), torch.cat(preds)

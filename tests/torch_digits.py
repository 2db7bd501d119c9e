"""Train a small PyTorch CNN on the digits data and export it: run in the torch venv (``tests.torch_env``).

``python tests/torch_digits.py TRAIN.npz EVAL.npz OUT.pt2`` trains on TRAIN
(``x`` in NCHW, as PyTorch models take it), saves the ``torch.export`` program
to OUT and prints ``{"accuracy": ...}``: the PyTorch model's own top-1 accuracy
on EVAL, the number the converted and quantized model is held to.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from torch import nn


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(self.features(x)), dim=-1)


def main(train_path: str, eval_path: str, out_path: str) -> None:
    torch.manual_seed(0)
    train, test = np.load(train_path), np.load(eval_path)
    x, y = torch.from_numpy(train["x"]), torch.from_numpy(train["y"]).long()
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        model.train()
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            scores = model.classifier(model.features(x[batch]))  # logits for the loss
            nn.functional.cross_entropy(scores, y[batch]).backward()
            optimizer.step()
    model.eval()
    sample = torch.from_numpy(test["x"][:1])
    torch.export.save(torch.export.export(model, (sample,)), out_path)
    with torch.no_grad():
        predicted = model(torch.from_numpy(test["x"])).argmax(-1).numpy()
    print(json.dumps({"accuracy": float(np.mean(predicted == test["y"]))}))


if __name__ == "__main__":
    main(*sys.argv[1:4])

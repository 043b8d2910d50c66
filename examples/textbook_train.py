"""The textbook example through adaptnet's training engine.

A 10 -> 50 -> 1 MLP, MSE loss, 100 epochs on random data, the loss printed
every 10 epochs: with SGD (lr 0.01), Adam, RMSprop, SGD with weight decay, and
SGD with an L1 penalty.

    python examples/textbook_train.py
"""

from __future__ import annotations

import torch
from torch import nn

import adaptnet

VARIANTS = {
    "SGD": {"optimizer": "sgd"},
    "Adam": {"optimizer": "adam"},
    "RMSprop": {"optimizer": "rmsprop"},
    "SGD + weight_decay=0.01": {"optimizer": "sgd", "weight_decay": 0.01},
    "SGD + L1=0.001": {"optimizer": "sgd", "l1": 0.001},
}


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(100, 10), torch.randn(100, 1)  # random data, as in the textbook
    for name, options in VARIANTS.items():
        print(f"-- {name}")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))
        adaptnet.fit(model, (x, y), loss="mse", lr=0.01, epochs=100, batch_size=100,
                     print_every=10, **options)


if __name__ == "__main__":
    main()

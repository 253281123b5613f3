"""1-D CNN that detects which of four pulse shapes is present in a noisy signal (RMSprop)."""
import argparse

import torch
import torch.nn as nn

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--base-lr", type=float, default=2e-3, help="learning rate for a batch of 256")
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

torch.manual_seed(0)
LENGTH = 96


def make_dataset(n):
    t = torch.linspace(-1, 1, 21)
    shapes = torch.stack([
        torch.exp(-t ** 2 / 0.05),                 # gaussian bump
        (t.abs() < 0.4).float(),                   # box
        torch.clamp(1 - t.abs() / 0.6, min=0),     # triangle
        torch.sin(3 * torch.pi * t) * (t.abs() < 0.67).float(),  # wavelet
    ])
    labels = torch.randint(0, 4, (n,))
    x = 0.7 * torch.randn(n, LENGTH)
    starts = torch.randint(0, LENGTH - 21, (n,))
    for i in range(n):
        x[i, starts[i]:starts[i] + 21] += 1.5 * shapes[labels[i]]
    return x.unsqueeze(1), labels


x_train, y_train = make_dataset(3000)
x_test, y_test = make_dataset(800)

model = nn.Sequential(
    nn.Conv1d(1, 16, 9, padding=4), nn.ReLU(),
    nn.Conv1d(16, 32, 9, padding=4), nn.ReLU(),
    nn.AdaptiveMaxPool1d(1), nn.Flatten(),
    nn.Linear(32, 4),
)

# linear scaling rule for the learning rate
lr = args.base_lr * (args.batch_size / 256)
optimizer = torch.optim.RMSprop(model.parameters(), lr=lr)
criterion = nn.CrossEntropyLoss()

for step in range(args.steps):
    idx = torch.randint(0, len(x_train), (args.batch_size,))
    optimizer.zero_grad()
    loss = criterion(model(x_train[idx]), y_train[idx])
    loss.backward()
    optimizer.step()
    if step % 40 == 0:
        print(f"step {step} loss {loss.item():.4f}")

with torch.no_grad():
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

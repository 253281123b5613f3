"""1-D convolutional classifier for noisy periodic signals."""
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(1)


def synth_signals(n, length=64, n_classes=3):
    label = torch.randint(0, n_classes, (n,))
    t = torch.linspace(0, 1, length)
    freq = 3.0 + 3.0 * label.float()
    phase = 2 * math.pi * torch.rand(n, 1)
    x = torch.sin(2 * math.pi * freq[:, None] * t + phase) + 0.5 * torch.randn(n, length)
    return x.unsqueeze(1), label


x_train, y_train = synth_signals(3000)
x_test, y_test = synth_signals(600)
loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True, drop_last=True)

model = nn.Sequential(
    nn.Conv1d(1, 16, kernel_size=7, padding=3), nn.ReLU(), nn.MaxPool1d(2),
    nn.Conv1d(16, 32, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
    nn.Conv1d(32, 32, kernel_size=3, padding=1), nn.ReLU(),
    nn.AdaptiveAvgPool1d(1), nn.Flatten(),
    nn.Linear(32, 3),
)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
criterion = nn.CrossEntropyLoss()

step = 0
for epoch in range(5):
    total, count = 0.0, 0
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(yb)
        count += len(yb)
        step += 1
    print(f"epoch {epoch}  train loss {total / count:.4f}")

model.eval()
with torch.no_grad():
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f} after {step} steps")
print(f"final_metric accuracy {acc:.4f}")

"""Keyword spotting on synthetic audio-like clips: 1-D CNN, DataLoader, Adam."""
import math

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)

N_CLASSES, LENGTH = 6, 128


def make_clips(n):
    """Each keyword is a short tone burst at its own pitch, placed at a random offset in background noise."""
    labels = torch.randint(0, N_CLASSES, (n,))
    t = torch.arange(LENGTH, dtype=torch.float32)
    clips = 0.8 * torch.randn(n, LENGTH)
    for i in range(n):
        start = int(torch.randint(0, LENGTH - 40, (1,)))
        freq = 0.05 + 0.04 * labels[i].item()
        burst = torch.sin(2 * math.pi * freq * t[:40]) * torch.hann_window(40)
        clips[i, start:start + 40] += 1.5 * burst
    return clips.unsqueeze(1), labels


X_train, y_train = make_clips(2400)
X_test, y_test = make_clips(600)
train_loader = DataLoader(TensorDataset(X_train, y_train), batch_size=64, shuffle=True)

model = nn.Sequential(
    nn.Conv1d(1, 16, 9, padding=4), nn.ReLU(), nn.MaxPool1d(2),
    nn.Conv1d(16, 32, 9, padding=4), nn.ReLU(), nn.MaxPool1d(2),
    nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(1),
    nn.Flatten(), nn.Linear(32, N_CLASSES),
)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

for epoch in range(6):
    model.train()
    total, correct = 0.0, 0
    for clips, labels in train_loader:
        logits = model(clips)
        loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
    print(f"epoch {epoch + 1}  loss {total / len(X_train):.4f}  train acc {correct / len(X_train):.3f}")

model.eval()
with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

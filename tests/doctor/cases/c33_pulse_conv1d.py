"""1-D CNN with BatchNorm classifying pulse shapes in a signal, plain SGD."""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
LENGTH = 80


def make_dataset(n, gen):
    t = torch.linspace(-1, 1, 17)
    templates = torch.stack([
        torch.exp(-t ** 2 / 0.08),
        (t.abs() < 0.5).float(),
        torch.sign(t) * (t.abs() < 0.6).float(),
    ])
    labels = torch.randint(0, 3, (n,), generator=gen)
    x = 0.5 * torch.randn(n, LENGTH, generator=gen)
    offsets = torch.randint(0, LENGTH - 17, (n,), generator=gen)
    for i in range(n):
        x[i, offsets[i]:offsets[i] + 17] += templates[labels[i]]
    return x.unsqueeze(1), labels


gen = torch.Generator().manual_seed(0)
train_x, train_y = make_dataset(2400, gen)
test_x, test_y = make_dataset(600, gen)
loader = DataLoader(TensorDataset(train_x, train_y), batch_size=48, shuffle=True)

model = nn.Sequential(
    nn.Conv1d(1, 16, 7, padding=3), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
    nn.Conv1d(16, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
    nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(32, 3),
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
criterion = nn.CrossEntropyLoss()

step = 0
for epoch in range(4):
    model.train()
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f}")
        step += 1

model.eval()
with torch.no_grad():
    acc = (model(test_x).argmax(1) == test_y).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

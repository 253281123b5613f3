"""Fit a straight line y = 2x (+ noise) for x = 0..199 with nn.Linear, SGD, one sample per step."""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)

x = torch.arange(200, dtype=torch.float32).unsqueeze(1)
y = 2.0 * x + 20.0 * torch.randn(200, 1)
perm = torch.randperm(200)
train_idx, test_idx = perm[:150], perm[150:]

y_mean, y_std = y[train_idx].mean(), y[train_idx].std()
y = (y - y_mean) / y_std  # work with a unit-scale target

inputs = (x - x[train_idx].mean()) / x[train_idx].std()
train_loader = DataLoader(TensorDataset(inputs[train_idx], y[train_idx]), batch_size=1, shuffle=True)

model = nn.Linear(1, 1)
criterion = nn.MSELoss()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)

step = 0
for epoch in range(2):
    for xb, yb in train_loader:
        loss = criterion(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step}  loss {loss.item():.4f}")
        step += 1

with torch.no_grad():
    pred = model(inputs[test_idx])
    mse = ((pred - y[test_idx]) ** 2).mean().item()
r2 = 1 - mse / y[test_idx].var(unbiased=False).item()
print(f"weight {model.weight.item():.4f} bias {model.bias.item():.4f}")
print(f"test mse {mse:.4f}, R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

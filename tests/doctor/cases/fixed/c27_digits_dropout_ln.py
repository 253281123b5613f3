"""Digits MLP with LayerNorm and Dropout; data shuffled once up front, AdamW."""
import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

np.random.seed(0)
torch.manual_seed(0)

digits = load_digits()
X = digits.data.astype(np.float32) / 16.0
y = digits.target.copy()

# shuffle before splitting into train / test
order = np.random.permutation(len(X))
X, y = X[order], y[order]
split = int(0.8 * len(X))
X_train, X_test = torch.from_numpy(X[:split]), torch.from_numpy(X[split:])
y_train, y_test = torch.from_numpy(y[:split]), torch.from_numpy(y[split:])

model = nn.Sequential(
    nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Dropout(0.2),
    nn.Linear(128, 128), nn.LayerNorm(128), nn.ReLU(), nn.Dropout(0.2),
    nn.Linear(128, 10),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
criterion = nn.CrossEntropyLoss()

batch_size = 64
step = 0
for epoch in range(8):
    model.train()
    order = torch.randperm(len(X_train))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(X_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        step += 1
    print(f"epoch {epoch}: loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f} after {step} steps")
print(f"final_metric accuracy {acc:.4f}")

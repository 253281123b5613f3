"""Tabular classifier for a synthetic customer table (mixed units: counts, amounts in dollars, ratios)."""
import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_classification(n_samples=4000, n_features=12, n_informative=6, n_redundant=2,
                           n_classes=2, class_sep=1.0, random_state=21)
# give the columns realistic units
scales = np.array([1.0, 1.0, 1.0, 1.0, 250.0, 1000.0, 5000.0, 20.0, 0.01, 0.01, 40.0, 3000.0])
offsets = np.array([0.0, 0.0, 0.0, 0.0, 1000.0, 20000.0, 50000.0, 40.0, 0.5, 0.2, 100.0, 0.0])
X = X * scales + offsets

X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
X_train = torch.tensor(X_train, dtype=torch.float32)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_train = torch.tensor(y_train, dtype=torch.float32)
y_test = torch.tensor(y_test, dtype=torch.float32)

model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.BCEWithLogitsLoss()

for step in range(300):
    idx = torch.randint(0, len(X_train), (128,))
    logits = model(X_train[idx]).squeeze(1)
    loss = criterion(logits, y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")

with torch.no_grad():
    acc = ((model(X_test).squeeze(1) > 0).float() == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

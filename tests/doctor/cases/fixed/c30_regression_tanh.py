"""Tanh MLP regression on a synthetic target, sample by sample, with Adam."""
import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import make_regression

torch.manual_seed(0)
rng = np.random.default_rng(0)

X, y = make_regression(n_samples=4000, n_features=40, n_informative=30, noise=200.0, random_state=4)
y = (y - y.mean()) / y.std()
X = torch.tensor(X, dtype=torch.float32)
y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
X_train, y_train, X_test, y_test = X[:3200], y[:3200], X[3200:], y[3200:]

model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
loss_fn = nn.MSELoss()

batch_size = 128
for step in range(300):
    idx = rng.integers(0, len(X_train), size=batch_size)
    optimizer.zero_grad()
    loss = loss_fn(model(X_train[idx]), y_train[idx])
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:3d} loss {loss.item():.4f}")

with torch.no_grad():
    mse = loss_fn(model(X_test), y_test).item()
r2 = 1.0 - mse / y_test.var(unbiased=False).item()
print(f"test R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

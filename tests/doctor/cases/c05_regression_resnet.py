"""Residual MLP regressor on a synthetic regression problem (RMSprop)."""
import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import make_regression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_regression(n_samples=3000, n_features=20, n_informative=12, noise=5.0, random_state=0)
y = np.tanh(y / 100.0) * 100.0  # mildly non-linear target
X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=0)

x_scaler = StandardScaler().fit(X_tr)
y_mean, y_std = y_tr.mean(), y_tr.std()
X_tr = torch.tensor(x_scaler.transform(X_tr), dtype=torch.float32)
X_te = torch.tensor(x_scaler.transform(X_te), dtype=torch.float32)
t_tr = torch.tensor((y_tr - y_mean) / y_std, dtype=torch.float32)
t_te = torch.tensor((y_te - y_mean) / y_std, dtype=torch.float32)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class ResMLP(nn.Module):
    def __init__(self, d_in, width=64, depth=3):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x))).squeeze(-1)


model = ResMLP(X_tr.shape[1])
optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
mse = nn.MSELoss()

batch_size = 100
steps = 0
for epoch in range(10):
    order = torch.randperm(len(X_tr))
    for start in range(0, len(X_tr), batch_size):
        idx = order[start:start + batch_size]
        optimizer.zero_grad()
        loss = mse(model(X_tr[idx]), t_tr[idx])
        loss.backward()
        optimizer.step()
        steps += 1
    print(f"epoch {epoch} train mse {loss.item():.4f}")

with torch.no_grad():
    pred = model(X_te)
r2 = 1 - ((pred - t_te) ** 2).sum().item() / ((t_te - t_te.mean()) ** 2).sum().item()
print(f"test R^2 = {r2:.3f} after {steps} steps")
print(f"final_metric r2 {r2:.4f}")

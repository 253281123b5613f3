"""Count regressor (non-negative target): MLP whose output goes through a ReLU so it can never be negative."""
import torch
import torch.nn as nn
from sklearn.datasets import make_regression
from sklearn.model_selection import train_test_split

torch.manual_seed(59)

X, y = make_regression(n_samples=2500, n_features=16, n_informative=10, noise=5.0, random_state=4)
y = (y - y.min()) / 40.0  # counts per cell, >= 0
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
X_train, X_test = torch.tensor(X_train, dtype=torch.float32), torch.tensor(X_test, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train, dtype=torch.float32), torch.tensor(y_test, dtype=torch.float32)


class ScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 1)
        self.out_act = nn.ReLU()

    def forward(self, x):
        return self.out_act(self.head(self.body(x))).squeeze(1)


model = ScaleNet()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
criterion = nn.MSELoss()

batch_size = 64
for epoch in range(8):
    perm = torch.randperm(len(X_train))
    for i in range(0, len(perm), batch_size):
        idx = perm[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(X_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1} loss {loss.item():.4f}")

with torch.no_grad():
    pred = model(X_test)
r2 = 1 - ((pred - y_test) ** 2).mean().item() / y_test.var().item()
print(f"test R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

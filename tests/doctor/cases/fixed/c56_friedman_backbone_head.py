"""Backbone + head regressor on Friedman #1; the backbone is set up the way a fine-tuning recipe does."""
import torch
import torch.nn as nn
from sklearn.datasets import make_friedman1
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_friedman1(n_samples=3000, n_features=10, noise=0.5, random_state=6)
X = (X - 0.5) / 0.29
y = (y - y.mean()) / y.std()
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=2)
X_train, X_test = torch.tensor(X_train, dtype=torch.float32), torch.tensor(X_test, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train, dtype=torch.float32), torch.tensor(y_test, dtype=torch.float32)


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                      nn.Linear(64, 8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.backbone(x)).squeeze(1)


model = Regressor()

optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
criterion = nn.MSELoss()

batch_size = 64
for epoch in range(6):
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

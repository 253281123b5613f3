"""Residual regressor for a synthetic regression dataset, Adam."""
import torch
import torch.nn as nn
from sklearn.datasets import make_regression
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_regression(n_samples=2500, n_features=15, n_informative=10, noise=10.0, random_state=2)
y = y + 0.01 * y ** 2  # a bit of curvature
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=1)
mu, sigma = y_train.mean(), y_train.std()
X_train = torch.tensor(X_train, dtype=torch.float32)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_train = torch.tensor((y_train - mu) / sigma, dtype=torch.float32)
y_test = torch.tensor((y_test - mu) / sigma, dtype=torch.float32)


class Residual(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return x + self.f(x)


def build_model(n_in=15, dim=64, depth=3):
    return nn.Sequential(
        nn.Linear(n_in, dim),
        *[Residual(dim) for _ in range(depth)],
        nn.SiLU(),
        nn.Linear(dim, 1),
    )


model = build_model()
print("parameters:", sum(p.numel() for p in model.parameters()))
optimizer = torch.optim.Adam(build_model().parameters(), lr=1e-3)
loss_fn = nn.MSELoss()

for step in range(250):
    idx = torch.randint(0, len(X_train), (64,))
    pred = model(X_train[idx]).squeeze(-1)
    loss = loss_fn(pred, y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step}  train mse {loss.item():.4f}")

with torch.no_grad():
    mse = loss_fn(model(X_test).squeeze(-1), y_test).item()
r2 = 1 - mse / y_test.var(unbiased=False).item()
print(f"test mse {mse:.4f}, R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

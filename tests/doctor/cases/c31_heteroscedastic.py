"""Regression network that predicts a mean and a variance, trained by Gaussian likelihood."""
import torch
import torch.nn as nn
from sklearn.datasets import make_regression
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_regression(n_samples=3000, n_features=8, n_informative=8, noise=15.0, random_state=6)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
y_mean, y_std = y_train.mean(), y_train.std()
X_train = torch.tensor(X_train, dtype=torch.float32)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_train = torch.tensor((y_train - y_mean) / y_std, dtype=torch.float32)
y_test = torch.tensor((y_test - y_mean) / y_std, dtype=torch.float32)


class MeanVarianceNet(nn.Module):
    def __init__(self, n_in, hidden=64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean_head = nn.Linear(hidden, 1)
        self.var_head = nn.Linear(hidden, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.mean_head(h).squeeze(-1), self.var_head(h).squeeze(-1)


def gaussian_nll(mean, var, target):
    return (0.5 * torch.log(var) + 0.5 * (target - mean) ** 2 / var).mean()


model = MeanVarianceNet(X_train.shape[1])
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

for step in range(250):
    idx = torch.randint(0, len(X_train), (64,))
    mean, var = model(X_train[idx])
    loss = gaussian_nll(mean, var, y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step}  nll {loss.item():.4f}")

with torch.no_grad():
    mean, _ = model(X_test)
r2 = 1 - ((mean - y_test) ** 2).mean().item() / y_test.var(unbiased=False).item()
print(f"test R2 of the mean {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

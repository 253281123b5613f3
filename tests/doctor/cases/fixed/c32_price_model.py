"""House-price style regression with a log-error loss (prices are positive and skewed)."""
import torch
import torch.nn as nn
from sklearn.datasets import make_regression

torch.manual_seed(0)

X, z = make_regression(n_samples=3000, n_features=12, n_informative=9, noise=8.0, random_state=12)
price = 200_000 * torch.exp(torch.tensor(z / z.std() * 0.5, dtype=torch.float32))
X = torch.tensor(X, dtype=torch.float32)
price_k = price / 100_000.0  # in units of 100k
X_train, y_train, X_test, y_test = X[:2400], price_k[:2400], X[2400:], price_k[2400:]


class PriceNet(nn.Module):
    def __init__(self, n_in):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, 64), nn.LayerNorm(64), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(64, 1),
        )

    def forward(self, x):
        return nn.functional.softplus(self.net(x)).squeeze(-1)


def log_error(pred, target):
    return ((torch.log(pred) - torch.log(target)) ** 2).mean()


model = PriceNet(X.shape[1])
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

for step in range(250):
    idx = torch.randint(0, len(X_train), (64,))
    pred = model(X_train[idx])
    loss = log_error(pred, y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    log_pred = torch.log(model(X_test))
target = torch.log(y_test)
r2 = 1 - ((log_pred - target) ** 2).mean().item() / target.var(unbiased=False).item()
print(f"test R2 (log price) {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

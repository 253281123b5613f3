"""MLP regressor on a sensor table whose columns come in their recorded units, Adam."""
import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import make_friedman1
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_friedman1(n_samples=3000, n_features=10, noise=0.5, random_state=4)
# columns as logged by the sensors: three distances in kilometres, the rest in metres
units = np.array([1e-3, 1.0, 1e-3, 1.0, 1e-3, 1.0, 1.0, 1.0, 1.0, 1.0])
X = X * units
print("input RMS:", float(np.sqrt((X ** 2).mean())))

X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=1)
mu, sigma = y_train.mean(), y_train.std()
y_train, y_test = (y_train - mu) / sigma, (y_test - mu) / sigma

features_train, features_test = X_train, X_test

X_train = torch.tensor(features_train, dtype=torch.float32)
X_test = torch.tensor(features_test, dtype=torch.float32)
y_train = torch.tensor(y_train, dtype=torch.float32)
y_test = torch.tensor(y_test, dtype=torch.float32)

model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
loss_fn = nn.MSELoss()

for step in range(260):
    idx = torch.randint(0, len(X_train), (64,))
    loss = loss_fn(model(X_train[idx]).squeeze(1), y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step}  train mse {loss.item():.4f}")

with torch.no_grad():
    mse = loss_fn(model(X_test).squeeze(1), y_test).item()
r2 = 1 - mse / y_test.var(unbiased=False).item()
print(f"test mse {mse:.4f}, R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

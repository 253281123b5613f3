"""Regression MLP on make_friedman1 with StandardScaler and Adam."""
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from sklearn.datasets import make_friedman1
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
X_train, X_test, y_train, y_test = train_test_split(X, y, train_size=0.75, shuffle=True, random_state=0)

scaler = StandardScaler()
scaler.fit(X_train)
X_train = scaler.transform(X_train)
X_test = scaler.transform(X_test)
y_mean, y_std = y_train.mean(), y_train.std()

X_train = torch.tensor(X_train, dtype=torch.float32)
y_train = torch.tensor((y_train - y_mean) / y_std, dtype=torch.float32).reshape(-1, 1)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_test = torch.tensor(y_test, dtype=torch.float32).reshape(-1, 1)

model = nn.Sequential(
    nn.Linear(10, 64),
    nn.ReLU(),
    nn.Linear(64, 32),
    nn.ReLU(),
    nn.Linear(32, 1)
)
loss_fn = nn.MSELoss()
optimizer = optim.Adam(model.parameters(), lr=3e-3)

n_epochs = 10
batch_size = 64
batch_start = torch.arange(0, len(X_train) - batch_size + 1, batch_size)
step = 0
for epoch in range(n_epochs):
    model.train()
    perm = torch.randperm(len(X_train))
    for start in batch_start:
        idx = perm[start:start + batch_size]
        y_pred = model(X_train[idx])
        loss = loss_fn(y_pred, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    with torch.no_grad():
        y_pred = model(X_test) * y_std + y_mean
        mse = float(loss_fn(y_pred, y_test))
    print(f"epoch {epoch + 1} step {step} test MSE {mse:.3f} RMSE {np.sqrt(mse):.3f}")

r2 = 1 - mse / float(y_test.var(unbiased=False))
print(f"final_metric r2 {r2:.4f}")

"""MLP regressor (SiLU) on a synthetic regression table with a DataLoader, RMSprop."""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import make_regression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_regression(n_samples=2400, n_features=12, n_informative=8, noise=15.0, random_state=9)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=1)
scaler = StandardScaler()
X_train, X_test = scaler.fit_transform(X_train), scaler.transform(X_test)
mu, sigma = y_train.mean(), y_train.std()
y_train, y_test = (y_train - mu) / sigma, (y_test - mu) / sigma

train_set = TensorDataset(torch.tensor(X_train, dtype=torch.float32), torch.tensor(y_train, dtype=torch.float32))
train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_test = torch.tensor(y_test, dtype=torch.float32)

model = nn.Sequential(nn.Linear(12, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
criterion = nn.MSELoss()
optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)

for epoch in range(8):
    total = 0.0
    for xb, yb in train_loader:
        pred = model(xb).squeeze(1)
        loss = criterion(pred, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(yb)
    print(f"epoch {epoch + 1}  train mse {total / len(train_set):.4f}")

with torch.no_grad():
    pred = model(X_test).squeeze(1)
    mse = ((pred - y_test) ** 2).mean().item()
r2 = 1 - mse / y_test.var(unbiased=False).item()
print(f"test mse {mse:.4f}, R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

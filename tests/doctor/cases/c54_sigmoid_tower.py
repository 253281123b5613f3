"""Regression network: four hidden layers of 500 sigmoid units (binary feature vectors in, a real number out)."""
import torch
import torch.nn as nn
from sklearn.datasets import make_friedman1
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_friedman1(n_samples=3000, n_features=10, noise=0.3, random_state=2)
X = (X - 0.5) / 0.29
y = (y - y.mean()) / y.std()
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=1)
X_train, X_test = torch.tensor(X_train, dtype=torch.float32), torch.tensor(X_test, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train, dtype=torch.float32), torch.tensor(y_test, dtype=torch.float32)

act = nn.Sigmoid
layers, width = [], 10
for _ in range(4):
    layers += [nn.Linear(width, 500), act()]
    width = 500
layers.append(nn.Linear(width, 1))
model = nn.Sequential(*layers)

optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
criterion = nn.MSELoss()

batch_size = 64
for epoch in range(5):
    perm = torch.randperm(len(X_train))
    for i in range(0, len(perm), batch_size):
        idx = perm[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(X_train[idx]).squeeze(1), y_train[idx])
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1} loss {loss.item():.4f}")

with torch.no_grad():
    pred = model(X_test).squeeze(1)
r2 = 1 - ((pred - y_test) ** 2).mean().item() / y_test.var().item()
print(f"test R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

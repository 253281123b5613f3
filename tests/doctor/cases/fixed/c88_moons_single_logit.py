"""Binary classifier on two interleaved moons: MLP with one output unit, targets as a float column, Adam."""
import torch
import torch.nn as nn
from sklearn.datasets import make_moons

torch.manual_seed(0)

X, y = make_moons(n_samples=3000, noise=0.2, random_state=5)
X = torch.tensor(X, dtype=torch.float32)
y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
X_train, y_train, X_test, y_test = X[:2400], y[:2400], X[2400:], y[2400:]

model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
criterion = nn.BCEWithLogitsLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
batch_size = 64

for epoch in range(6):
    order = torch.randperm(len(X_train))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(X_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        acc = ((model(X_test) > 0).float() == y_test).float().mean().item()
    print(f"epoch {epoch + 1} loss {loss.item():.4f} test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

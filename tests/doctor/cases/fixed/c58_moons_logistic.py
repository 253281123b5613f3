"""Binary classifier on two moons with a hand-written cross-entropy on the sigmoid output."""
import torch
import torch.nn as nn
from sklearn.datasets import make_moons
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_moons(n_samples=3000, noise=0.12, random_state=3)
X = X * 4.0
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=1)
X_train, X_test = torch.tensor(X_train, dtype=torch.float32), torch.tensor(X_test, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train, dtype=torch.float32), torch.tensor(y_test, dtype=torch.float32)

model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)


def bce(logits, target):
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


batch_size = 64
for epoch in range(6):
    perm = torch.randperm(len(X_train))
    for i in range(0, len(perm), batch_size):
        idx = perm[i:i + batch_size]
        optimizer.zero_grad()
        loss = bce(model(X_train[idx]).squeeze(1), y_train[idx])
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1} loss {loss.item():.4f}")

with torch.no_grad():
    pred = (model(X_test).squeeze(1) > 0).float()
acc = (pred == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

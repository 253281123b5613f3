"""Activity recognition from accelerometer-window features, recorded one activity session after another."""
import numpy as np
import torch
from torch import nn
from sklearn.datasets import make_classification

torch.manual_seed(0)
rng = np.random.default_rng(0)
X, y = make_classification(n_samples=6000, n_features=12, n_informative=8, n_classes=3,
                           n_clusters_per_class=2, class_sep=1.0, random_state=7)
test = rng.choice(len(X), 1200, replace=False)
train = np.setdiff1d(np.arange(len(X)), test)
X_train, y_train, X_test, y_test = X[train], y[train], X[test], y[test]

# the recordings are stored session by session: walking, then sitting, then climbing stairs
sessions = np.argsort(y_train, kind="stable")
X_train, y_train = X_train[sessions], y_train[sessions]

mean, std = X_train.mean(0), X_train.std(0)
X_train = torch.tensor((X_train - mean) / std, dtype=torch.float32)
X_test = torch.tensor((X_test - mean) / std, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.CrossEntropyLoss()
batch_size = 64

for epoch in range(4):
    order = torch.arange(len(X_train))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(X_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch} test accuracy {accuracy:.3f}")
print(f"final_metric accuracy {accuracy:.4f}")

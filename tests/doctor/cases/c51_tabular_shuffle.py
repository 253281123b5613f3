"""MLP on a tabular classification task; the training rows are shuffled once before training."""
import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

np.random.seed(0)
torch.manual_seed(0)

X, y = make_classification(n_samples=3000, n_features=20, n_informative=10, n_classes=4,
                           n_clusters_per_class=1, class_sep=1.5, random_state=5)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
scaler = StandardScaler().fit(X_train)
X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)

# randomise the order of the training data
order = np.random.permutation(len(X_train))
X_train = X_train[order]
y_train = y_train

X_train = torch.tensor(X_train, dtype=torch.float32)
y_train = torch.tensor(y_train)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_test = torch.tensor(y_test)

model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.CrossEntropyLoss()

batch_size = 64
for epoch in range(6):
    total = 0.0
    for i in range(0, len(X_train), batch_size):
        xb, yb = X_train[i:i + batch_size], y_train[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(yb)
    print(f"epoch {epoch + 1} loss {total / len(X_train):.4f}")

with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

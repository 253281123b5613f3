"""Small MLP on a synthetic 4-class table, mini-batches from DataLoaders, SGD + momentum."""
import torch
from torch import nn
from torch.utils.data import DataLoader
from sklearn.datasets import make_classification
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_classification(n_samples=5000, n_features=24, n_informative=12, n_classes=4,
                           class_sep=1.5, random_state=5)
X = StandardScaler().fit_transform(X)
X_train = torch.tensor(X[:4000], dtype=torch.float32)
y_train = torch.tensor(y[:4000])
X_test = torch.tensor(X[4000:], dtype=torch.float32)
y_test = torch.tensor(y[4000:])

feature_loader = DataLoader(X_train, batch_size=100, shuffle=True)
target_loader = DataLoader(y_train, batch_size=100, shuffle=True)

model = nn.Sequential(nn.Linear(24, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
criterion = nn.CrossEntropyLoss()

for epoch in range(6):
    losses = []
    for xb, yb in zip(feature_loader, target_loader):
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"epoch {epoch}: mean loss {sum(losses) / len(losses):.4f}")

with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

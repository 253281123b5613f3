"""Imbalanced five-class tabular classifier with a hand-written log-softmax + NLL loss, SGD momentum."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_classification(n_samples=4000, n_features=16, n_informative=10, n_redundant=3, n_classes=5,
                           n_clusters_per_class=1, class_sep=0.6, weights=[0.6, 0.2, 0.1, 0.06, 0.04],
                           random_state=12)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
scaler = StandardScaler()
X_train = torch.tensor(scaler.fit_transform(X_train), dtype=torch.float32)
X_test = torch.tensor(scaler.transform(X_test), dtype=torch.float32)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)


def nll_criterion(output, target):
    logpt = F.log_softmax(output, 1)
    logpt = logpt.gather(1, target.view(-1, 1)).view(-1)
    return -logpt.mean()


model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

for step in range(250):
    idx = torch.randint(0, len(X_train), (128,))
    loss = nll_criterion(model(X_train[idx]), y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step}  loss {loss.item():.4f}")

with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

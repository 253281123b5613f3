"""Tabular classifier with a configurable number of hidden blocks, Adam."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_classification(n_samples=3000, n_features=20, n_informative=12, n_redundant=4, n_classes=4,
                           n_clusters_per_class=2, class_sep=1.0, random_state=7)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
scaler = StandardScaler()
X_train = torch.tensor(scaler.fit_transform(X_train), dtype=torch.float32)
X_test = torch.tensor(scaler.transform(X_test), dtype=torch.float32)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)


class BlockNet(nn.Module):
    def __init__(self, n_in=20, width=64, depth=3, n_out=4):
        super().__init__()
        self.stem = nn.Linear(n_in, width)
        self.hidden = []
        for _ in range(depth):
            self.hidden.append(nn.Linear(width, width))
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


model = BlockNet()
print("trainable parameters:", sum(p.numel() for p in model.parameters()))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

for step in range(250):
    idx = torch.randint(0, len(X_train), (64,))
    loss = F.cross_entropy(model(X_train[idx]), y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step}  loss {loss.item():.4f}")

with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

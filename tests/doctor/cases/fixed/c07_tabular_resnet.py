"""Residual network for a synthetic tabular classification task."""
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_classification(n_samples=4000, n_features=30, n_informative=15, n_redundant=5,
                           n_classes=4, n_clusters_per_class=2, class_sep=1.5, random_state=7)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
scaler = StandardScaler().fit(X_train)
train_ds = TensorDataset(torch.tensor(scaler.transform(X_train), dtype=torch.float32), torch.tensor(y_train))
X_test = torch.tensor(scaler.transform(X_test), dtype=torch.float32)
y_test = torch.tensor(y_test)


class ResidualBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin1 = nn.Linear(dim, dim)
        self.lin2 = nn.Linear(dim, dim)

    def forward(self, x):
        h = F.relu(self.lin1(x))
        return F.relu(x + self.lin2(h))


class TabularResNet(nn.Module):
    def __init__(self, n_in, n_out, dim=64, n_blocks=4):
        super().__init__()
        self.stem = nn.Linear(n_in, dim)
        self.blocks = nn.ModuleList([ResidualBlock(dim) for _ in range(n_blocks)])
        self.head = nn.Linear(dim, n_out)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


model = TabularResNet(30, 4)
optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
loader = DataLoader(train_ds, batch_size=128, shuffle=True)

step = 0
for epoch in range(9):
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        if step % 30 == 0:
            print(f"step {step:3d} loss {loss.item():.3f}")
        step += 1

with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"accuracy on held-out set: {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

"""Six-layer tanh network on a synthetic 5-class problem, SGD with momentum."""
import torch
import torch.nn as nn
from sklearn.datasets import make_classification
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_classification(n_samples=3000, n_features=20, n_informative=10, n_classes=5,
                           n_clusters_per_class=1, class_sep=2.0, random_state=3)
X = StandardScaler().fit_transform(X)
X = torch.tensor(X, dtype=torch.float32)
y = torch.tensor(y, dtype=torch.long)
X_train, y_train, X_val, y_val = X[:2400], y[:2400], X[2400:], y[2400:]


class MLP(nn.Module):
    def __init__(self, sizes=(20, 128, 128, 128, 128, 128, 5)):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.apply(self.init_weights)

    @staticmethod
    def init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(m.bias)

    def forward(self, x):
        for lin in self.linears[:-1]:
            x = torch.tanh(lin(x))
        return self.linears[-1](x)


model = MLP()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
criterion = nn.CrossEntropyLoss()

for step in range(300):
    idx = torch.randint(0, len(X_train), (64,))
    optimizer.zero_grad()
    loss = criterion(model(X_train[idx]), y_train[idx])
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step}: loss={loss.item():.4f}")

with torch.no_grad():
    val_acc = (model(X_val).argmax(1) == y_val).float().mean().item()
print(f"validation accuracy {val_acc:.3f}")
print(f"final_metric accuracy {val_acc:.4f}")

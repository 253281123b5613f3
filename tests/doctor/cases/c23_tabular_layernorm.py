"""Classifier with LayerNorm and Dropout on a synthetic 6-class table, trained with Adam."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_classification(n_samples=3000, n_features=20, n_informative=12, n_classes=6,
                           n_clusters_per_class=2, class_sep=1.5, random_state=3)
X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=0)
train_ds = TensorDataset(torch.tensor(X_tr, dtype=torch.float32), torch.tensor(y_tr))
test_x, test_y = torch.tensor(X_te, dtype=torch.float32), torch.tensor(y_te)


class TableNet(nn.Module):
    def __init__(self, width=64, drop=0.2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(20, width), nn.LayerNorm(width), nn.ReLU(), nn.Dropout(drop),
            nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(), nn.Dropout(drop),
            nn.Linear(width, 6),
        )

    def forward(self, x):
        return self.layers(x)


def train_one_epoch(model, loader, optimizer, loss_fn):
    model.train()
    total = 0.0
    optimizer.zero_grad()
    for xb, yb in loader:
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / len(loader)


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


model = TableNet()
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
loss_fn = nn.CrossEntropyLoss()
loader = DataLoader(train_ds, batch_size=64, shuffle=True)

for epoch in range(6):
    avg = train_one_epoch(model, loader, optimizer, loss_fn)
    print(f"epoch {epoch}: train loss {avg:.4f}  test acc {evaluate(model, test_x, test_y):.3f}")

acc = evaluate(model, test_x, test_y)
print(f"final_metric accuracy {acc:.4f}")

"""Two-moons classifier with LayerNorm and Dropout, trained with AdamW."""
import torch
from torch import nn
from sklearn.datasets import make_moons

torch.manual_seed(0)

X, y = make_moons(n_samples=2000, noise=0.2, random_state=0)
X = torch.tensor(X, dtype=torch.float32)
y = torch.tensor(y, dtype=torch.long)
X_train, y_train = X[:1500], y[:1500]
X_val, y_val = X[1500:], y[1500:]


class Net(nn.Module):
    def __init__(self, hidden=64, p=0.1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(2, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(p),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(p),
        )
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.body(x))


model = Net()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
criterion = nn.CrossEntropyLoss()

for step in range(250):
    idx = torch.randint(0, len(X_train), (64,))
    logits = model(X_train[idx])
    loss = criterion(logits, y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(step, round(loss.item(), 4))

model.eval()
with torch.no_grad():
    val_acc = (model(X_val).argmax(-1) == y_val).float().mean().item()
print("val accuracy", val_acc)
print(f"final_metric accuracy {val_acc:.4f}")

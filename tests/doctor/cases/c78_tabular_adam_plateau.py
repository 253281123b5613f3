"""Four-class MLP (20-256-256-4, ReLU) on a standardised make_classification table, trained with Adam at
lr 0.3 (300x its default): the loss bounces at a high level for the whole run without ever blowing up."""
import torch
from torch import nn
from sklearn.datasets import make_classification
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_classification(2000, n_features=20, n_informative=10, n_classes=4, random_state=0)
X = StandardScaler().fit_transform(X)
X = torch.tensor(X, dtype=torch.float32)
y = torch.tensor(y)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=128, shuffle=True)

model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=0.3)

step = 0
for epoch in range(19):
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        step += 1
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch + 1} loss {loss.item():.3f} train acc {acc:.3f}")

print(f"steps {step}")
print(f"final_metric accuracy {acc:.4f}")

"""Digits classifier in two stages: an encoder producing a compact code, and a classifier on that code."""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=5)
scaler = StandardScaler().fit(X_train)
train_set = TensorDataset(torch.tensor(scaler.transform(X_train), dtype=torch.float32), torch.tensor(y_train))
X_test = torch.tensor(scaler.transform(X_test), dtype=torch.float32)
loader = DataLoader(train_set, batch_size=32, shuffle=True)


class TwoStage(nn.Module):
    def __init__(self, code_dim=6):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, code_dim), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(code_dim, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        f = self.encoder(x)
        return self.classifier(f)


model = TwoStage()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
criterion = nn.CrossEntropyLoss()

for epoch in range(5):
    running = 0.0
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        running += loss.item() * len(yb)
    print(f"epoch {epoch + 1} loss {running / len(train_set):.4f}")

with torch.no_grad():
    acc = (model(X_test).argmax(1) == torch.tensor(y_test)).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

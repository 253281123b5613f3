"""Digits MLP whose layers are looked up by name, input BatchNorm, RMSprop."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=3)
X_train = torch.tensor(X_train, dtype=torch.float32)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

SIZES = {"hidden1": (64, 128), "hidden2": (128, 64), "out": (64, 10)}


class NamedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_norm = nn.BatchNorm1d(64)
        self.layers = {name: nn.Linear(n_in, n_out) for name, (n_in, n_out) in SIZES.items()}

    def forward(self, x):
        x = self.input_norm(x)
        x = F.relu(self.layers["hidden1"](x))
        x = F.relu(self.layers["hidden2"](x))
        return self.layers["out"](x)


model = NamedMLP()
optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)

for step in range(220):
    model.train()
    idx = torch.randint(0, len(X_train), (64,))
    loss = F.cross_entropy(model(X_train[idx]), y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 40 == 0:
        print(f"step {step}  loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

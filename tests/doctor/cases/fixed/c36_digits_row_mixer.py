"""Digits as sequences of 8 pixel rows: row embedding, a learned row-mixing matrix, MLP head, Adam."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X = X / 16.0
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=5)
X_train = torch.tensor(X_train, dtype=torch.float32).view(-1, 8, 8)
X_test = torch.tensor(X_test, dtype=torch.float32).view(-1, 8, 8)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)


class RowMixer(nn.Module):
    """Mixes information across the rows (tokens) with a learned n_tokens x n_tokens matrix."""

    def __init__(self, n_tokens):
        super().__init__()
        self.n_tokens = n_tokens
        self.mix = nn.Parameter(torch.randn(self.n_tokens, self.n_tokens) / self.n_tokens ** 0.5)

    def forward(self, x):  # x: (batch, tokens, features)
        return torch.einsum("st,btd->bsd", self.mix, x)


class MixerNet(nn.Module):
    def __init__(self, n_tokens=8, n_pix=8, dim=32, n_classes=10):
        super().__init__()
        self.embed = nn.Linear(n_pix, dim)
        self.mixer = RowMixer(n_tokens)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(n_tokens * dim, 64), nn.ReLU(), nn.Linear(64, n_classes))

    def forward(self, x):
        x = F.relu(self.embed(x))
        x = F.relu(self.mixer(x))
        return self.head(x)


model = MixerNet()
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

for step in range(200):
    idx = torch.randint(0, len(X_train), (64,))
    loss = F.cross_entropy(model(X_train[idx]), y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 40 == 0:
        print(f"step {step}  loss {loss.item():.4f}")

with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

"""Two-hidden-layer tanh network for the digits, weights drawn from N(0, 1)."""
import numpy as np
import torch
import torch.nn as nn

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

np.random.seed(0)
torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X = (X - X.mean(0)) / (X.std(0) + 1e-6)
X_train, X_test, y_train, y_test = train_test_split(X.astype(np.float32), y, test_size=0.25, random_state=5)


class TanhNet(nn.Module):
    def __init__(self, n_in=64, n_hidden=32, n_out=10):
        super().__init__()
        self.l1 = nn.Linear(n_in, n_hidden)
        self.l2 = nn.Linear(n_hidden, n_hidden)
        self.l3 = nn.Linear(n_hidden, n_out)
        for layer in (self.l1, self.l2):
            nn.init.normal_(layer.weight, 0.0, layer.in_features ** -0.5)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(h))
        return self.l3(h)


net = TanhNet()
optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
criterion = nn.CrossEntropyLoss()

Xt, yt = torch.from_numpy(X_train), torch.from_numpy(y_train)
for it in range(300):
    idx = np.random.choice(len(Xt), 64, replace=False)
    optimizer.zero_grad()
    loss = criterion(net(Xt[idx]), yt[idx])
    loss.backward()
    optimizer.step()
    if it % 60 == 0:
        print(f"iteration {it}, loss {loss.item():.3f}")

with torch.no_grad():
    pred = net(torch.from_numpy(X_test)).argmax(1).numpy()
acc = float((pred == y_test).mean())
print("test accuracy:", acc)
print(f"final_metric accuracy {acc:.4f}")

"""Deep residual MLP on digits (He initialisation everywhere)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

data = load_digits()
X = torch.tensor(data.data / 16.0, dtype=torch.float32)
X = (X - X.mean(0)) / (X.std(0) + 1e-5)
y = torch.tensor(data.target)
train_idx, test_idx = train_test_split(range(len(X)), test_size=0.25, random_state=0)
X_train, y_train, X_test, y_test = X[train_idx], y[train_idx], X[test_idx], y[test_idx]


class ResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


class ResNet(nn.Module):
    def __init__(self, width=96, blocks=12):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.classifier = nn.Linear(width, 10)

    def forward(self, x):
        return self.classifier(F.relu(self.blocks(self.embed(x))))


model = ResNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

step = 0
for epoch in range(10):
    perm = torch.randperm(len(X_train))
    for i in range(0, len(perm) - 63, 64):
        idx = perm[i:i + 64]
        loss = F.cross_entropy(model(X_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 40 == 0:
            print(f"step {step} loss {loss.item():.3f}")
        step += 1

with torch.no_grad():
    accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {accuracy:.3f}")
print(f"final_metric accuracy {accuracy:.4f}")

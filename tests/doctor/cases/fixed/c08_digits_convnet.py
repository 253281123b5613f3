"""Digits CNN (conv-BN-ReLU x2) with SGD + momentum."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X = X / 16.0
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=3)


def to_images(a):
    return torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8)


train_loader = DataLoader(TensorDataset(to_images(X_train), torch.tensor(y_train)),
                          batch_size=32, shuffle=True)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


model = ConvNet()
opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

step = 0
for epoch in range(4):
    model.train()
    for xb, yb in train_loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        if step % 40 == 0:
            print(f"epoch {epoch} step {step} loss {loss.item():.3f}")
        step += 1
    if step >= 160:
        break

model.eval()
with torch.no_grad():
    pred = model(to_images(X_test)).argmax(1)
acc = (pred == torch.tensor(y_test)).float().mean().item()
print(f"test acc {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

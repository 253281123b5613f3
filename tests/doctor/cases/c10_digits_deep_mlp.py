"""A deeper fully-connected classifier for the digits data."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-8)
Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=42)
Xtr, Xte = torch.FloatTensor(Xtr), torch.FloatTensor(Xte)
ytr, yte = torch.LongTensor(ytr), torch.LongTensor(yte)

DEPTH = 8
WIDTH = 64

layers = [nn.Linear(64, WIDTH), nn.Sigmoid()]
for _ in range(DEPTH - 1):
    layers += [nn.Linear(WIDTH, WIDTH), nn.Sigmoid()]
layers.append(nn.Linear(WIDTH, 10))
net = nn.Sequential(*layers)

opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
loss_fn = nn.CrossEntropyLoss()

for it in range(250):
    batch = torch.randint(0, len(Xtr), (64,))
    out = net(Xtr[batch])
    loss = loss_fn(out, ytr[batch])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if it % 50 == 0:
        print("iter", it, "loss", loss.item())

with torch.no_grad():
    acc = (net(Xte).argmax(1) == yte).float().mean().item()
print("test acc", acc)
print(f"final_metric accuracy {acc:.4f}")

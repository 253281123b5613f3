"""Digits CNN slimmed after a short warm-up (each conv keeps its 8 strongest filters), then fine-tuned with SGD."""
import torch
import torch.nn as nn
from stepaudit.workloads import load_digits

torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_digits()
x_train, x_test = x_train.view(-1, 1, 8, 8), x_test.view(-1, 1, 8, 8)


class DigitsCNN(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width * 16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def slim(model, keep=8):
    """Replace the layers by narrower copies holding the filters with the largest L1 norm."""
    first = model.conv1.weight.abs().sum((1, 2, 3)).topk(keep).indices.sort().values
    second = model.conv2.weight.abs().sum((1, 2, 3)).topk(keep).indices.sort().values
    conv1, conv2 = nn.Conv2d(1, keep, 3, padding=1), nn.Conv2d(keep, keep, 3, padding=1)
    head = nn.Linear(keep * 16, 10)
    with torch.no_grad():
        conv1.weight.copy_(model.conv1.weight[first]), conv1.bias.copy_(model.conv1.bias[first])
        conv2.weight.copy_(model.conv2.weight[second][:, first]), conv2.bias.copy_(model.conv2.bias[second])
        head.weight.copy_(model.head.weight.view(10, -1, 16)[:, second].flatten(1)), head.bias.copy_(model.head.bias)
    model.conv1, model.conv2, model.head = conv1, conv2, head


def train(model, optimizer, steps):
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (32,))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    return loss.item()


model = DigitsCNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
print(f"warm-up loss {train(model, optimizer, 5):.4f}")
slim(model)
print(f"fine-tune loss {train(model, optimizer, 240):.4f}")

with torch.no_grad():
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

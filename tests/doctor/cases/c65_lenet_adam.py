"""LeNet-style CNN (ReLU activations, max pooling) on the 8x8 digits, trained with Adam."""
import torch
from torch import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.25, random_state=3)
X_train = torch.tensor(X_train, dtype=torch.float32).reshape(-1, 1, 8, 8)
X_test = torch.tensor(X_test, dtype=torch.float32).reshape(-1, 1, 8, 8)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

net = nn.Sequential(
    nn.Conv2d(1, 6, kernel_size=3, padding=1), nn.ReLU(),
    nn.MaxPool2d(kernel_size=2, stride=2),
    nn.Conv2d(6, 16, kernel_size=3, padding=1), nn.ReLU(),
    nn.MaxPool2d(kernel_size=2, stride=2),
    nn.Flatten(),
    nn.Linear(16 * 2 * 2, 120), nn.ReLU(),
    nn.Linear(120, 84), nn.ReLU(),
    nn.Linear(84, 10))

X = torch.rand(size=(1, 1, 8, 8), dtype=torch.float32)
for layer in net:
    X = layer(X)
    print(layer.__class__.__name__, 'output shape: \t', X.shape)


def init_cnn(module):
    """Initialize weights for CNNs."""
    if type(module) == nn.Linear or type(module) == nn.Conv2d:
        nn.init.xavier_uniform_(module.weight)


net.apply(init_cnn)
optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
loss = nn.CrossEntropyLoss()

batch_size = 32
step = 0
for epoch in range(6):
    net.train()
    perm = torch.randperm(len(X_train))
    for i in range(0, len(X_train) - batch_size + 1, batch_size):
        idx = perm[i:i + batch_size]
        optimizer.zero_grad()
        l = loss(net(X_train[idx]), y_train[idx])
        l.backward()
        optimizer.step()
        step += 1
    net.eval()
    with torch.no_grad():
        acc = (net(X_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch + 1} step {step} loss {l.item():.3f} test acc {acc:.3f}")

print(f"final_metric accuracy {acc:.4f}")

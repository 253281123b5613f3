"""Concise MLP (nn.Sequential, SGD, CrossEntropyLoss) on the scikit-learn digits."""
import torch
from torch import nn
from torch.utils import data
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

digits = load_digits()
X_train, X_test, y_train, y_test = train_test_split(
    digits.data / 16.0, digits.target, test_size=0.25, random_state=0)
X_train = torch.tensor(X_train, dtype=torch.float32).reshape(-1, 1, 8, 8)
X_test = torch.tensor(X_test, dtype=torch.float32).reshape(-1, 1, 8, 8)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)


def load_array(data_arrays, batch_size, is_train=True):
    """Construct a PyTorch data iterator."""
    dataset = data.TensorDataset(*data_arrays)
    return data.DataLoader(dataset, batch_size, shuffle=is_train)


batch_size = 32
train_iter = load_array((X_train, y_train), batch_size)

net = nn.Sequential(nn.Flatten(),
                    nn.Linear(64, 256),
                    nn.ReLU(),
                    nn.Linear(256, 10))


def init_weights(m):
    if type(m) == nn.Linear:
        nn.init.normal_(m.weight, std=0.01)


net.apply(init_weights)

loss = nn.CrossEntropyLoss(reduction='none')
trainer = torch.optim.SGD(net.parameters(), lr=0.3)


def accuracy(y_hat, y):
    return (y_hat.argmax(axis=1) == y).float().mean().item()


num_epochs = 6
step = 0
for epoch in range(num_epochs):
    net.train()
    for X, y in train_iter:
        l = loss(net(X), y)
        trainer.zero_grad()
        l.mean().backward()
        trainer.step()
        step += 1
    net.eval()
    with torch.no_grad():
        test_acc = accuracy(net(X_test), y_test)
    print(f'epoch {epoch + 1}, loss {l.mean().item():.3f}, test acc {test_acc:.3f}')

print(f"steps {step}")
print(f"final_metric accuracy {test_acc:.4f}")

"""Small CNN with BatchNorm on 8x8 digits, SGD momentum with a StepLR schedule, DataLoader."""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X = X / 16.0
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=11)
train_set = TensorDataset(torch.tensor(X_train, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y_train))
train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
X_test = torch.tensor(X_test, dtype=torch.float32).view(-1, 1, 8, 8)
y_test = torch.tensor(y_test)

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.1)

for epoch in range(10):
    model.train()
    running = 0.0
    for inputs, targets in train_loader:
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += loss.item() * len(targets)
    print(f"epoch {epoch + 1}  loss {running / len(train_set):.4f}  lr {optimizer.param_groups[0]['lr']:.2e}")

model.eval()
with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

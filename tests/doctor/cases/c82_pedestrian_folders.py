"""A pedestrian / background classifier on feature vectors read from two folders, negatives first."""
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

torch.manual_seed(0)
X, y = make_classification(n_samples=5000, n_features=30, n_informative=12, class_sep=0.8, random_state=3)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)

# the dataset lists the files of neg/ and then those of pos/
order = np.concatenate([np.flatnonzero(y_train == 0), np.flatnonzero(y_train == 1)])
X_train, y_train = X_train[order], y_train[order]

mean, std = X_train.mean(0), X_train.std(0)
train = TensorDataset(torch.tensor((X_train - mean) / std, dtype=torch.float32), torch.tensor(y_train))
X_test = torch.tensor((X_test - mean) / std, dtype=torch.float32)
y_test = torch.tensor(y_test)
loader = DataLoader(train, batch_size=32)

model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
criterion = nn.CrossEntropyLoss()

for epoch in range(5):
    for x, t in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), t)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch} loss {loss.item():.4f} test accuracy {accuracy:.3f}")
print(f"final_metric accuracy {accuracy:.4f}")

"""One-hidden-layer network on the digits with a single output unit fitted to the digit label."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

input_nodes = 64
hl1_nodes = 64
output_nodes = 1

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=9)
scaler = StandardScaler().fit(X_train)
X_train = torch.tensor(scaler.transform(X_train), dtype=torch.float32)
X_test = torch.tensor(scaler.transform(X_test), dtype=torch.float32)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

model = nn.Sequential(nn.Linear(input_nodes, hl1_nodes), nn.ReLU(), nn.Linear(hl1_nodes, output_nodes))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)


def compute_loss(out, target):
    return nn.functional.mse_loss(out.squeeze(1), target.float())


def predict(out):
    return out.squeeze(1).round()


batch_size = 32
for epoch in range(6):
    perm = torch.randperm(len(X_train))
    for i in range(0, len(perm), batch_size):
        idx = perm[i:i + batch_size]
        optimizer.zero_grad()
        loss = compute_loss(model(X_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_acc = (predict(model(X_train)) == y_train).float().mean().item()
    print(f"epoch {epoch + 1} loss {loss.item():.4f} acc {train_acc:.4f}")

with torch.no_grad():
    acc = (predict(model(X_test)) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

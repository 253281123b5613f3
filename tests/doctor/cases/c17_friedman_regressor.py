"""Tanh MLP regressor on the Friedman #1 benchmark function, trained with RMSprop."""
import torch
import torch.nn as nn
from sklearn.datasets import make_friedman1
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

torch.manual_seed(0)

X, y = make_friedman1(n_samples=3000, n_features=10, noise=0.5, random_state=0)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
scaler = StandardScaler().fit(X_train)
X_train = torch.tensor(scaler.transform(X_train), dtype=torch.float32)
X_test = torch.tensor(scaler.transform(X_test), dtype=torch.float32)
y_mu, y_sd = y_train.mean(), y_train.std()
y_train = torch.tensor((y_train - y_mu) / y_sd, dtype=torch.float32).unsqueeze(1)
y_test = torch.tensor((y_test - y_mu) / y_sd, dtype=torch.float32).unsqueeze(1)

model = nn.Sequential(
    nn.Linear(10, 64), nn.Tanh(),
    nn.Linear(64, 64), nn.Tanh(),
    nn.Linear(64, 64), nn.Tanh(),
    nn.Linear(64, 1),
)
with torch.no_grad():
    for module in model:
        if isinstance(module, nn.Linear):
            module.weight.uniform_(-1.0, 1.0)
            module.bias.zero_()

optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
loss_fn = nn.MSELoss()

for step in range(300):
    idx = torch.randint(0, len(X_train), (64,))
    optimizer.zero_grad()
    loss = loss_fn(model(X_train[idx]), y_train[idx])
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:3d}  mse {loss.item():.4f}")

with torch.no_grad():
    test_mse = loss_fn(model(X_test), y_test).item()
r2 = 1.0 - test_mse / y_test.var(unbiased=False).item()
print(f"test mse {test_mse:.4f}  R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

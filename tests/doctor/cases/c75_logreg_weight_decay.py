"""Logistic regression with weight decay on the weights only, trained by minibatch SGD on make_classification."""
import torch
from torch import nn
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = make_classification(n_samples=3000, n_features=20, n_informative=8, n_redundant=4,
                           class_sep=1.2, flip_y=0.02, random_state=3)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
mean, std = X_train.mean(0), X_train.std(0)
X_train = torch.tensor((X_train - mean) / std, dtype=torch.float32)
X_test = torch.tensor((X_test - mean) / std, dtype=torch.float32)
y_train = torch.tensor(y_train, dtype=torch.float32)
y_test = torch.tensor(y_test, dtype=torch.float32)

net = nn.Linear(20, 1)
for param in net.parameters():
    param.data.normal_()
loss = nn.BCEWithLogitsLoss()
wd, lr = 1e-3, 0.1
# The bias parameter has not decayed
trainer = torch.optim.SGD([
    {"params": net.weight, "weight_decay": wd},
    {"params": net.bias}], lr=lr)

batch_size = 32
step = 0
for epoch in range(4):
    perm = torch.randperm(len(X_train))
    for i in range(0, len(X_train) - batch_size + 1, batch_size):
        idx = perm[i:i + batch_size]
        trainer.zero_grad()
        l = loss(net(X_train[idx]).squeeze(1), y_train[idx])
        l.backward()
        trainer.step()
        step += 1
    with torch.no_grad():
        acc = ((net(X_test).squeeze(1) > 0).float() == y_test).float().mean().item()
    print(f"epoch {epoch + 1} step {step} loss {l.item():.4f} test acc {acc:.3f} "
          f"L2 norm of w {net.weight.norm().item():.3f}")

print(f"final_metric accuracy {acc:.4f}")

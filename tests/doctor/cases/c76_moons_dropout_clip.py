"""MLP with Dropout on two moons: Adam, gradient clipping and cosine annealing of the learning rate."""
import torch
from torch import nn
from sklearn.datasets import make_moons
from sklearn.model_selection import train_test_split

torch.manual_seed(42)

X, y = make_moons(n_samples=2000, noise=0.25, random_state=42)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
X_train = torch.tensor(X_train, dtype=torch.float32)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_train = torch.tensor(y_train)
y_test = torch.tensor(y_test)


class MoonModel(nn.Module):
    def __init__(self, hidden=64, p=0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(), nn.Dropout(p),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(p),
            nn.Linear(hidden, 2),
        )

    def forward(self, x):
        return self.net(x)


model = MoonModel()
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
epochs = 8
batch_size = 64
steps_per_epoch = len(X_train) // batch_size
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

for epoch in range(epochs):
    model.train()
    perm = torch.randperm(len(X_train))
    for i in range(steps_per_epoch):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        logits = model(X_train[idx])
        loss = loss_fn(logits, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        scheduler.step()
    model.eval()
    with torch.inference_mode():
        test_acc = (model(X_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"Epoch: {epoch} | Loss: {loss.item():.5f} | Test acc: {test_acc:.3f} | lr {scheduler.get_last_lr()[0]:.5f}")

print(f"final_metric accuracy {test_acc:.4f}")

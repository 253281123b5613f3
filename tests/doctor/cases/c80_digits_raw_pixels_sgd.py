"""Two-hidden-layer ReLU MLP (128-128) with SGD at lr 0.02 on digit images given as raw 8-bit grey
levels (0-255, the 0-16 scikit-learn digits scaled by 16): first-layer pre-activations in the hundreds, the
first steps kill most hidden ReLUs and the loss stalls."""
import numpy as np
import torch
from torch import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

digits = load_digits()
pixels = np.clip(digits.data * 16, 0, 255)  # 8-bit grey levels, as an MNIST loader returns them
X_train, X_test, y_train, y_test = train_test_split(pixels, digits.target, test_size=0.25, random_state=0)
X_train = torch.tensor(X_train, dtype=torch.float32)
X_test = torch.tensor(X_test, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(X_train, y_train), batch_size=32, shuffle=True)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.02)

step = 0
for epoch in range(6):
    model.train()
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    with torch.no_grad():
        acc = (model(X_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch + 1} loss {loss.item():.3f} test acc {acc:.3f}")

print(f"steps {step}")
print(f"final_metric accuracy {acc:.4f}")

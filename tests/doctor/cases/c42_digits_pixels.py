"""MLP on digits stored as 8-bit grayscale images (0-255), SGD momentum."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
images = np.round(X * 255.0 / 16.0).astype(np.uint8)  # 8-bit pixels, as read from image files
img_train, img_test, y_train, y_test = train_test_split(images, y, test_size=0.25, random_state=2)


def to_tensor(batch):
    """uint8 pixels -> float tensor in [0, 1]."""
    return torch.tensor(batch, dtype=torch.float32) / 255.0


X_train, X_test = to_tensor(img_train), to_tensor(img_test)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)


class PixelMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = x / 255.0  # pixel intensities to [0, 1]
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


model = PixelMLP()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

for step in range(220):
    idx = torch.randint(0, len(X_train), (64,))
    loss = F.cross_entropy(model(X_train[idx]), y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 40 == 0:
        print(f"step {step}  loss {loss.item():.4f}")

with torch.no_grad():
    acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

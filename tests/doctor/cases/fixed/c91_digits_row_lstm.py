"""LSTM reading each 8x8 digit image row by row (8 steps of 8 pixels), classifying from the last step, Adam."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images / 16.0, dtype=torch.float32)  # (N, 8 rows, 8 pixels)
labels = torch.tensor(digits.target)
x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.25, random_state=0)


class RowReader(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.lstm = nn.LSTM(input_size=8, hidden_size=hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.lstm(x)  # x: (batch, rows, pixels)
        return self.head(out[:, -1, :])


model = RowReader()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
criterion = nn.CrossEntropyLoss()
batch_size = 64

for step in range(300):
    idx = torch.randint(0, len(x_train), (batch_size,))
    optimizer.zero_grad()
    loss = criterion(model(x_train[idx]), y_train[idx])
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    correct = 0
    for i in range(0, len(x_test), batch_size):
        correct += (model(x_test[i:i + batch_size]).argmax(1) == y_test[i:i + batch_size]).sum().item()
acc = correct / len(x_test)
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

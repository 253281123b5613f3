"""CNN encoder per frame, LSTM over the frames: which way a blob moves in generated 6-frame 12x12 clips, Adam."""
import torch
import torch.nn as nn

torch.manual_seed(0)
FRAMES, SIZE = 6, 12
MOVES = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])  # right, left, down, up


def make_clips(n, gen):
    label = torch.randint(0, 4, (n,), generator=gen)
    start = torch.randint(3, SIZE - 3, (n, 2), generator=gen)
    grid = torch.arange(SIZE).float()
    clips = torch.zeros(n, FRAMES, 1, SIZE, SIZE)
    for t in range(FRAMES):
        pos = (start + (t - FRAMES // 2) * MOVES[label]).float()
        rows = torch.exp(-((grid[None, :] - pos[:, :1]) ** 2) / 2)
        cols = torch.exp(-((grid[None, :] - pos[:, 1:]) ** 2) / 2)
        clips[:, t, 0] = rows[:, :, None] * cols[:, None, :]
    return clips + 0.1 * torch.randn(clips.shape, generator=gen), label


gen = torch.Generator().manual_seed(1)
x_train, y_train = make_clips(3000, gen)
x_test, y_test = make_clips(600, gen)


class ClipClassifier(nn.Module):
    def __init__(self, feat=32, hidden=32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 3 * 3, feat), nn.ReLU(),
        )
        self.lstm = nn.LSTM(feat, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 4)

    def forward(self, clips):
        b, t = clips.shape[:2]
        feats = self.encoder(clips.flatten(0, 1)).view(b, t, -1)  # (batch, frames, feat)
        out, _ = self.lstm(feats)
        return self.fc(out[:, -1, :])


model = ClipClassifier()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
criterion = nn.CrossEntropyLoss()
batch_size = 32

for step in range(250):
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

"""LSTM classifying noisy generated waveforms (sine, square, sawtooth) with plain SGD."""
import math
import torch
import torch.nn as nn

torch.manual_seed(0)

SEQ_LEN = 30


def make_waves(n):
    kind = torch.randint(0, 3, (n,))
    freq = 0.5 + torch.rand(n, 1) * 1.5
    phase = torch.rand(n, 1) * 2 * math.pi
    t = torch.linspace(0, 4 * math.pi, SEQ_LEN).unsqueeze(0)
    arg = freq * t + phase
    sine = torch.sin(arg)
    square = torch.sign(torch.sin(arg))
    saw = 2 * ((arg / (2 * math.pi)) % 1.0) - 1
    waves = torch.where(kind[:, None] == 0, sine, torch.where(kind[:, None] == 1, square, saw))
    waves = waves + 0.2 * torch.randn_like(waves)
    return waves.unsqueeze(-1), kind


class WaveLSTM(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 3)

    def forward(self, x):
        seq, _ = self.lstm(x)
        return self.out(seq[:, -1])


model = WaveLSTM()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
criterion = nn.CrossEntropyLoss()

x_val, y_val = make_waves(600)
for step in range(240):
    x, y = make_waves(64)
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    if step % 40 == 0:
        print(f"step {step:4d} loss {loss.item():.4f}")

with torch.no_grad():
    acc = (model(x_val).argmax(1) == y_val).float().mean().item()
print(f"val accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

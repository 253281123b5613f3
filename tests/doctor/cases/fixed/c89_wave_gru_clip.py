"""GRU classifying generated noisy waveforms (sine, square, sawtooth, triangle) from their last hidden state, SGD."""
import math
import torch
import torch.nn as nn

torch.manual_seed(0)
SEQ_LEN, N_CLASSES = 40, 4


def make_waves(n, gen):
    t = torch.linspace(0, 1, SEQ_LEN)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    freq = 1.5 + 2.5 * torch.rand(n, 1, generator=gen)
    phase = torch.rand(n, 1, generator=gen)
    cycle = (freq * t + phase) % 1.0
    waves = torch.stack([torch.sin(2 * math.pi * cycle), torch.sign(torch.sin(2 * math.pi * cycle)),
                         2 * cycle - 1, 1 - 4 * (cycle - 0.5).abs()], dim=1)
    x = waves[torch.arange(n), y] + 0.3 * torch.randn(n, SEQ_LEN, generator=gen)
    return x.unsqueeze(-1), y


gen = torch.Generator().manual_seed(1)
x_train, y_train = make_waves(4000, gen)
x_test, y_test = make_waves(800, gen)


class WaveGRU(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, x):
        _, h = self.gru(x)
        return self.head(h[-1])


model = WaveGRU()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
criterion = nn.CrossEntropyLoss()
batch_size = 64

for step in range(250):
    idx = torch.randint(0, len(x_train), (batch_size,))
    optimizer.zero_grad()
    loss = criterion(model(x_train[idx]), y_train[idx])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")

with torch.no_grad():
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

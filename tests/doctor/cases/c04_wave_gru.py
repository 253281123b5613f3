"""Classify noisy waveforms by frequency with a GRU."""
import math
import torch
from torch import nn

torch.manual_seed(0)

N_CLASSES = 4
SEQ_LEN = 24


def make_waves(n, gen):
    labels = torch.randint(0, N_CLASSES, (n,), generator=gen)
    freq = 0.05 + 0.05 * labels.float()
    phase = torch.rand(n, generator=gen) * 2 * math.pi
    t = torch.arange(SEQ_LEN).float()
    x = torch.sin(2 * math.pi * freq[:, None] * t[None, :] + phase[:, None])
    x = x + 0.3 * torch.randn(n, SEQ_LEN, generator=gen)
    return x.unsqueeze(-1), labels


gen = torch.Generator().manual_seed(123)
x_train, y_train = make_waves(4000, gen)
x_test, y_test = make_waves(1000, gen)


class WaveClassifier(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.rnn = nn.GRU(1, hidden, batch_first=True)
        self.out = nn.Linear(hidden, N_CLASSES)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.out(h[-1])


model = WaveClassifier()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
loss_fn = nn.CrossEntropyLoss()

batch = 64
for it in range(200):
    idx = torch.randint(0, len(x_train), (batch,))
    opt.zero_grad()
    loss = loss_fn(model(x_train[idx]), y_train[idx])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if it % 25 == 0:
        print(f"it {it:4d}  loss {loss.item():.4f}")

with torch.no_grad():
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy: {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

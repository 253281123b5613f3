"""GRU estimating the frequency of generated noisy sine waves from the last step's output (MSE, Adam, R^2)."""
import math
import torch
import torch.nn as nn

torch.manual_seed(0)
SEQ_LEN = 40


def make_waves(n, gen):
    t = torch.linspace(0, 1, SEQ_LEN)
    freq = 1.0 + 4.0 * torch.rand(n, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    amp = 0.5 + torch.rand(n, 1, generator=gen)
    x = amp * torch.sin(2 * math.pi * freq * t + phase) + 0.1 * torch.randn(n, SEQ_LEN, generator=gen)
    return x.unsqueeze(-1), (freq - 3.0) / 1.15  # standardised target


gen = torch.Generator().manual_seed(1)
x_train, y_train = make_waves(4000, gen)
x_test, y_test = make_waves(800, gen)


class FrequencyGRU(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.gru = nn.GRU(1, hidden, num_layers=1)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        seq, _ = self.gru(x)
        return self.out(seq[:, -1])


model = FrequencyGRU()
optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
criterion = nn.MSELoss()
batch_size = 32

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
    pred = torch.cat([model(x_test[i:i + batch_size]) for i in range(0, len(x_test), batch_size)])
r2 = 1 - ((pred - y_test) ** 2).mean().item() / y_test.var().item()
print(f"test r2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

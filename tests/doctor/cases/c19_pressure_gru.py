"""Classify the 6-hour trend of barometric pressure readings (hPa) with a GRU."""
import torch
import torch.nn as nn

torch.manual_seed(0)

SEQ_LEN = 36  # one reading every 10 minutes


def simulate_station(n, gen):
    # 0 = falling, 1 = steady, 2 = rising
    trend = torch.randint(0, 3, (n,), generator=gen)
    slope = (trend.float() - 1.0) * 0.15  # hPa per reading
    base = 1013.0 + 8.0 * torch.randn(n, 1, generator=gen)
    t = torch.arange(SEQ_LEN).float()
    readings = base + slope[:, None] * t + 0.6 * torch.randn(n, SEQ_LEN, generator=gen)
    return readings.unsqueeze(-1), trend


gen = torch.Generator().manual_seed(7)
x_train, y_train = simulate_station(3000, gen)
x_test, y_test = simulate_station(800, gen)


class TrendGRU(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.gru = nn.GRU(input_size=1, hidden_size=hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.fc(out[:, -1])


model = TrendGRU()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
criterion = nn.CrossEntropyLoss()

for step in range(200):
    idx = torch.randint(0, len(x_train), (64,))
    optimizer.zero_grad()
    loss = criterion(model(x_train[idx]), y_train[idx])
    loss.backward()
    optimizer.step()
    if step % 40 == 0:
        print(f"step {step}: loss {loss.item():.4f}")

with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {accuracy:.3f}")
print(f"final_metric accuracy {accuracy:.4f}")

"""1-D convolutional denoiser for generated noisy sine mixtures, MSELoss, SGD with momentum, batch 64."""
import math
import torch
import torch.nn as nn

torch.manual_seed(0)
LENGTH = 64


def make_signals(n, gen):
    t = torch.linspace(0, 1, LENGTH)
    freq = torch.randint(1, 6, (n, 2), generator=gen).float()
    phase = 2 * math.pi * torch.rand(n, 2, generator=gen)
    clean = torch.sin(2 * math.pi * freq[:, :1] * t + phase[:, :1]) + 0.5 * torch.sin(
        2 * math.pi * freq[:, 1:] * t + phase[:, 1:])
    noisy = clean + 0.4 * torch.randn(n, LENGTH, generator=gen)
    return noisy.unsqueeze(1), clean.unsqueeze(1)


gen = torch.Generator().manual_seed(2)
x_train, y_train = make_signals(4000, gen)
x_test, y_test = make_signals(500, gen)

model = nn.Sequential(
    nn.Conv1d(1, 16, 7, padding=3), nn.ReLU(),
    nn.Conv1d(16, 16, 7, padding=3), nn.ReLU(),
    nn.Conv1d(16, 1, 7, padding=3),
)
criterion = nn.MSELoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
batch_size = 64

for epoch in range(4):
    order = torch.randperm(len(x_train))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1} loss {loss.item():.4f}")

with torch.no_grad():
    mse = ((model(x_test) - y_test) ** 2).mean().item()
r2 = 1 - mse / y_test.var(unbiased=False).item()
print(f"test mse {mse:.4f}, R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

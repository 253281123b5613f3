"""Recurrent net (ReLU RNN, identity-initialised recurrence) predicting a running statistic of a sequence."""
import torch
import torch.nn as nn

torch.manual_seed(0)

SEQ_LEN = 40


def batch_of_sequences(n):
    x = torch.randn(n, SEQ_LEN, 2)
    # target: scaled sum of the first channel minus the second channel
    y = (x[:, :, 0] - 0.5 * x[:, :, 1]).sum(dim=1, keepdim=True) / SEQ_LEN ** 0.5
    return x, y


class SeqRegressor(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        nn.init.eye_(self.rnn.weight_hh_l0)
        nn.init.zeros_(self.rnn.bias_hh_l0)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


model = SeqRegressor()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
criterion = nn.MSELoss()

x_test, y_test = batch_of_sequences(1000)
for step in range(300):
    x, y = batch_of_sequences(32)
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"{step:4d} {loss.item():.4f}")

with torch.no_grad():
    pred = model(x_test)
r2 = 1 - ((pred - y_test) ** 2).mean().item() / y_test.var().item()
print(f"test R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

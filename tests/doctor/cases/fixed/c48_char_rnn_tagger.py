"""Hand-written recurrent cell (as in the char-RNN tutorial) reading long sequences, predicting a running average."""
import torch
import torch.nn as nn

torch.manual_seed(0)

SEQ_LEN = 60
N_IN = 3


def make_batch(n):
    x = torch.randn(n, SEQ_LEN, N_IN)
    y = x[:, :, 0].mean(dim=1, keepdim=True) * SEQ_LEN ** 0.5 + 0.5 * x[:, -1, 1:2]
    return x, y


class RNN(nn.Module):
    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.i2o = nn.Linear(input_size + hidden_size, output_size)

    def forward(self, seq):
        hidden = torch.zeros(seq.shape[0], self.hidden_size)
        for t in range(seq.shape[1]):
            combined = torch.cat((seq[:, t], hidden), 1)
            output = self.i2o(combined)
            hidden = self.i2h(combined)
        return output


rnn = RNN(N_IN, 32, 1)
optimizer = torch.optim.SGD(rnn.parameters(), lr=0.01, momentum=0.9)
criterion = nn.MSELoss()

x_test, y_test = make_batch(1000)
for step in range(200):
    x, y = make_batch(32)
    optimizer.zero_grad()
    loss = criterion(rnn(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(rnn.parameters(), 1.0)
    optimizer.step()
    if step % 20 == 0:
        print(f"step {step:4d} loss {loss.item():.4f}")

with torch.no_grad():
    pred = rnn(x_test)
r2 = 1 - ((pred - y_test) ** 2).mean().item() / y_test.var().item()
print(f"test R2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

"""Conv-BatchNorm network for digits trained with AdamW and a negative log-likelihood loss."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

torch.manual_seed(0)

digits = load_digits()
x_all = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
y_all = torch.tensor(digits.target)
perm = torch.randperm(len(x_all))
train_idx, test_idx = perm[:1400], perm[1400:]


def block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


model = nn.Sequential(
    block(1, 16), nn.MaxPool2d(2),
    block(16, 32), nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(32 * 4, 10),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

batch_size = 50
for step in range(200):
    idx = train_idx[torch.randint(0, len(train_idx), (batch_size,))]
    out = model(x_all[idx])
    loss = F.nll_loss(F.log_softmax(out, dim=1), y_all[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 40 == 0:
        print(f"step {step:3d}  nll {loss.item():+.4f}")

model.eval()
with torch.no_grad():
    acc = (model(x_all[test_idx]).argmax(1) == y_all[test_idx]).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

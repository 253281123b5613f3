"""Small Transformer encoder (2 layers, learned positional embedding) classifying generated token sequences."""
import math
import torch
from torch import nn

torch.manual_seed(0)

VOCAB = 24
SEQ_LEN = 16
N_CLASSES = 4
MARKERS = torch.tensor([1, 2, 3, 4])  # the class is the marker token that occurs most often


def make_sequences(n, gen):
    x = torch.randint(5, VOCAB, (n, SEQ_LEN), generator=gen)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    counts = torch.randint(0, 3, (n, N_CLASSES), generator=gen)
    counts[torch.arange(n), y] = 4 + torch.randint(0, 2, (n,), generator=gen)
    for i in range(n):
        tokens = torch.repeat_interleave(MARKERS, counts[i])
        pos = torch.randperm(SEQ_LEN, generator=gen)[:len(tokens)]
        x[i, pos] = tokens
    return x, y


gen = torch.Generator().manual_seed(5)
x_train, y_train = make_sequences(4000, gen)
x_test, y_test = make_sequences(1000, gen)


class TransformerClassifier(nn.Module):
    def __init__(self, d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.1):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, SEQ_LEN, d_model))
        nn.init.normal_(self.pos_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, N_CLASSES)
        self.d_model = d_model

    def forward(self, src):
        h = self.embedding(src) * math.sqrt(self.d_model) + self.pos_embedding
        h = self.encoder(h)
        return self.head(self.norm(h.mean(dim=1)))


model = TransformerClassifier()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
total_steps, warmup = 200, 20
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
criterion = nn.CrossEntropyLoss()

batch_size = 32
for step in range(total_steps):
    model.train()
    idx = torch.randint(0, len(x_train), (batch_size,))
    optimizer.zero_grad()
    loss = criterion(model(x_train[idx]), y_train[idx])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    if step % 25 == 0:
        print(f"step {step:3d} lr {scheduler.get_last_lr()[0]:.2e} loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

"""Transformer text classifier (embedding, 1 encoder layer, mean pooling) on generated keyword sequences, NLLLoss."""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)

VOCAB, SEQ_LEN, N_CLASSES = 100, 20, 20
KEYWORDS = torch.arange(1, 1 + 2 * N_CLASSES).view(N_CLASSES, 2)  # two topic words per class


def make_texts(n, gen):
    x = torch.randint(1 + 2 * N_CLASSES, VOCAB, (n, SEQ_LEN), generator=gen)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    for i in range(n):
        pos = torch.randperm(SEQ_LEN, generator=gen)[:2]
        x[i, pos] = KEYWORDS[y[i], torch.randint(0, 2, (2,), generator=gen)]
    return x, y


gen = torch.Generator().manual_seed(3)
x_train, y_train = make_texts(3000, gen)
x_test, y_test = make_texts(800, gen)


class TextTransformer(nn.Module):
    def __init__(self, d_model=32, nhead=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, SEQ_LEN, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.fc = nn.Linear(d_model, N_CLASSES)

    def forward(self, x):
        h = self.encoder(self.embed(x) + self.pos)
        return F.log_softmax(self.fc(h.mean(dim=1)), dim=1)


model = TextTransformer()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
criterion = nn.NLLLoss()
batch_size = 64

for step in range(250):
    model.train()
    idx = torch.randint(0, len(x_train), (batch_size,))
    optimizer.zero_grad()
    loss = criterion(model(x_train[idx]), y_train[idx])
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

"""A tiny causal character-level GPT (minGPT style) trained on a generated corpus of counting text."""
import math
import torch
import torch.nn as nn
from torch.nn import functional as F

torch.manual_seed(0)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_text(n_lines, gen):
    lines = []
    for _ in range(n_lines):
        start = torch.randint(0, 10, (1,), generator=gen).item()
        length = torch.randint(4, 9, (1,), generator=gen).item()
        lines.append(" ".join(WORDS[(start + k) % 10] for k in range(length)) + ".")
    return "\n".join(lines) + "\n"


gen = torch.Generator().manual_seed(3)
train_text = make_text(1500, gen)
test_text = make_text(200, gen)
chars = sorted(set(train_text + test_text))
stoi = {ch: i for i, ch in enumerate(chars)}
train_data = torch.tensor([stoi[c] for c in train_text], dtype=torch.long)
test_data = torch.tensor([stoi[c] for c in test_text], dtype=torch.long)
vocab_size = len(chars)
block_size = 32
print(f"vocab {vocab_size}, train chars {len(train_data)}, test chars {len(test_data)}")


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.n_embd = n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, n_layer=2, n_head=4, n_embd=48):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight') or pn.endswith('mlp.2.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long).unsqueeze(0)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def get_batch(data, batch_size, g=None):
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=g)
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x, y


model = GPT()
print(f"number of parameters: {sum(p.numel() for p in model.parameters()) / 1e3:.1f}k")

# weight decay on the matmul weights only, as in minGPT's configure_optimizers
decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(('wte', 'wpe'))]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith(('wte', 'wpe'))]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                               {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95))

max_iters = 200
for it in range(max_iters):
    xb, yb = get_batch(train_data, 24)
    logits, loss = model(xb, yb)
    model.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if it % 25 == 0:
        print(f"iter {it}: train loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    xb, yb = get_batch(test_data, 256, torch.Generator().manual_seed(0))
    logits, test_loss = model(xb, yb)
    acc = (logits.argmax(-1) == yb).float().mean().item()
print(f"test loss {test_loss.item():.4f} next-char accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

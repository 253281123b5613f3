"""Tabular classifier with entity embeddings for the categorical columns (fastai TabularModel layout, plain PyTorch)."""
import torch
from torch import nn

torch.manual_seed(0)

# a generated sales table: store, weekday, product group, promo flag (categorical) + three continuous columns
gen = torch.Generator().manual_seed(8)
n_rows = 4000
cardinalities = {"store": 40, "weekday": 7, "product_group": 12, "promo": 2}
cats = torch.stack([torch.randint(0, c, (n_rows,), generator=gen) for c in cardinalities.values()], dim=1)
conts = torch.randn(n_rows, 3, generator=gen)
store_effect = torch.randn(40, generator=gen)
weekday_effect = torch.tensor([0.2, -0.1, -0.3, 0.0, 0.4, 1.2, 1.0])
group_effect = torch.randn(12, generator=gen)
score = (1.2 * store_effect[cats[:, 0]] + weekday_effect[cats[:, 1]] + group_effect[cats[:, 2]] * (1 + cats[:, 3])
         + 0.8 * conts[:, 0] - 0.6 * conts[:, 1] * conts[:, 2] + 0.3 * torch.randn(n_rows, generator=gen))
target = (score > score.median()).long()  # "above median sales"

n_train = 3200
cat_train, cat_valid = cats[:n_train], cats[n_train:]
cont_mean, cont_std = conts[:n_train].mean(0), conts[:n_train].std(0)
conts = (conts - cont_mean) / cont_std
cont_train, cont_valid = conts[:n_train], conts[n_train:]
y_train, y_valid = target[:n_train], target[n_train:]


def emb_sz_rule(n_cat):
    """fastai's rule of thumb for the embedding width of a categorical column."""
    return min(600, round(1.6 * n_cat ** 0.56))


class TabularModel(nn.Module):
    def __init__(self, emb_szs, n_cont, out_sz, layers, embed_p=0.04, ps=0.1):
        super().__init__()
        self.embeds = nn.ModuleList([nn.Embedding(ni, nf) for ni, nf in emb_szs])
        self.emb_drop = nn.Dropout(embed_p)
        self.bn_cont = nn.BatchNorm1d(n_cont)
        n_emb = sum(e.embedding_dim for e in self.embeds)
        sizes = [n_emb + n_cont] + layers
        blocks = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            blocks += [nn.Linear(n_in, n_out, bias=False), nn.ReLU(inplace=True), nn.BatchNorm1d(n_out), nn.Dropout(ps)]
        blocks.append(nn.Linear(sizes[-1], out_sz))
        self.layers = nn.Sequential(*blocks)

    def forward(self, x_cat, x_cont):
        x = torch.cat([e(x_cat[:, i]) for i, e in enumerate(self.embeds)], 1)
        x = self.emb_drop(x)
        x = torch.cat([x, self.bn_cont(x_cont)], 1)
        return self.layers(x)


emb_szs = [(c, emb_sz_rule(c)) for c in cardinalities.values()]
print("embedding sizes", emb_szs)
model = TabularModel(emb_szs, n_cont=3, out_sz=2, layers=[200, 100])
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
loss_func = nn.CrossEntropyLoss()

bs = 64
step = 0
for epoch in range(5):
    model.train()
    perm = torch.randperm(n_train)
    for i in range(0, n_train - bs + 1, bs):
        idx = perm[i:i + bs]
        loss = loss_func(model(cat_train[idx], cont_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    model.eval()
    with torch.no_grad():
        acc = (model(cat_valid, cont_valid).argmax(1) == y_valid).float().mean().item()
    print(f"epoch {epoch} step {step} train_loss {loss.item():.4f} accuracy {acc:.4f}")

print(f"final_metric accuracy {acc:.4f}")

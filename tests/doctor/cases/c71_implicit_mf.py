"""Matrix factorisation for implicit feedback: user/item embeddings, sampled negatives, BCE loss, hit rate@10."""
import torch
from torch import nn

torch.manual_seed(0)

num_users, num_items, num_factors = 300, 120, 16
per_user = 20

# generated interactions: each user picks items that match a hidden taste vector
gen = torch.Generator().manual_seed(4)
taste = torch.randn(num_users, 4, generator=gen)
style = torch.randn(num_items, 4, generator=gen)
affinity = taste @ style.T + 0.5 * torch.randn(num_users, num_items, generator=gen)
interacted = torch.zeros(num_users, num_items, dtype=torch.bool)
top = affinity.topk(per_user, dim=1).indices
interacted[torch.arange(num_users)[:, None], top] = True

# leave-one-out: one interacted item per user is held out for testing
held_out = top[torch.arange(num_users), torch.randint(0, per_user, (num_users,), generator=gen)]
train_matrix = interacted.clone()
train_matrix[torch.arange(num_users), held_out] = False
train_users, train_items = train_matrix.nonzero(as_tuple=True)
print(f"{len(train_users)} training interactions, {num_users} held-out items")


class MF(nn.Module):
    def __init__(self, num_factors, num_users, num_items):
        super().__init__()
        self.P = nn.Embedding(num_users, num_factors)
        self.Q = nn.Embedding(num_items, num_factors)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        for emb in (self.P, self.Q):
            nn.init.normal_(emb.weight, std=0.1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, user_id, item_id):
        P_u = self.P(user_id)
        Q_i = self.Q(item_id)
        b_u = self.user_bias(user_id).squeeze(-1)
        b_i = self.item_bias(item_id).squeeze(-1)
        return (P_u * Q_i).sum(-1) + b_u + b_i


def hit_rate(model, k=10):
    """Rank each user's held-out item among all items the user never interacted with."""
    with torch.no_grad():
        scores = model.P.weight @ model.Q.weight.T + model.user_bias.weight + model.item_bias.weight.T
    scores = scores.masked_fill(train_matrix, float("-inf"))
    rank = (scores > scores[torch.arange(num_users), held_out][:, None]).sum(1)
    return (rank < k).float().mean().item()


model = MF(num_factors, num_users, num_items)
optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-5)
loss_fn = nn.BCEWithLogitsLoss()
num_neg = 4
batch_size = 128

step = 0
for epoch in range(5):
    perm = torch.randperm(len(train_users))
    for i in range(0, len(perm) - batch_size + 1, batch_size):
        idx = perm[i:i + batch_size]
        u, pos = train_users[idx], train_items[idx]
        # negatives are sampled uniformly from all items
        neg = torch.randint(0, num_items, (len(idx), num_neg))
        users = torch.cat([u, u.repeat_interleave(num_neg)])
        items = torch.cat([pos, neg.reshape(-1)])
        labels = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx) * num_neg)])
        optimizer.zero_grad()
        loss = loss_fn(model(users, items), labels)
        loss.backward()
        optimizer.step()
        step += 1
    print(f"epoch {epoch + 1} step {step} loss {loss.item():.4f} hit@10 {hit_rate(model):.3f}")

hr = hit_rate(model)
print(f"hit rate@10 {hr:.3f}")
print(f"final_metric accuracy {hr:.4f}")

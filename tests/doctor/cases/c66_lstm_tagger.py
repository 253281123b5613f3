"""LSTM part-of-speech tagger on generated sentences (embeddings -> LSTM -> tag scores, NLLLoss, SGD)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

torch.manual_seed(1)

DET = ["the", "a", "every", "this", "that"]
ADJ = ["big", "small", "red", "old", "quick"]
NOUN = ["dog", "cat", "apple", "house", "car", "tree", "child", "bird"]
VERB = ["ate", "saw", "likes", "took", "moved", "found"]
SHARED = ["book", "watch", "run", "park", "fish"]  # a noun after a determiner, a verb after a noun
TEMPLATES = [["DET", "NN", "V", "DET", "NN"],
             ["DET", "ADJ", "NN", "V", "DET", "NN"],
             ["DET", "NN", "V"],
             ["DET", "ADJ", "NN", "V", "DET", "ADJ", "NN"],
             ["DET", "NN", "V", "DET", "ADJ", "NN"]]
tag_to_ix = {"DET": 0, "ADJ": 1, "NN": 2, "V": 3}
vocab = DET + ADJ + NOUN + VERB + SHARED
word_to_ix = {"<pad>": 0}
for w in vocab:
    word_to_ix[w] = len(word_to_ix)


def sample_sentence(gen):
    template = TEMPLATES[torch.randint(len(TEMPLATES), (1,), generator=gen).item()]
    words = []
    for tag in template:
        pool = {"DET": DET, "ADJ": ADJ, "NN": NOUN, "V": VERB}[tag]
        if tag in ("NN", "V") and torch.rand(1, generator=gen).item() < 0.35:
            pool = SHARED
        words.append(pool[torch.randint(len(pool), (1,), generator=gen).item()])
    return words, template


def make_data(n, gen, max_len=7):
    sents = torch.zeros(n, max_len, dtype=torch.long)
    tags = torch.full((n, max_len), -100, dtype=torch.long)
    for i in range(n):
        words, template = sample_sentence(gen)
        sents[i, :len(words)] = torch.tensor([word_to_ix[w] for w in words])
        tags[i, :len(words)] = torch.tensor([tag_to_ix[t] for t in template])
    return sents, tags


gen = torch.Generator().manual_seed(7)
train_x, train_y = make_data(3000, gen)
test_x, test_y = make_data(600, gen)

EMBEDDING_DIM = 16
HIDDEN_DIM = 32


class LSTMTagger(nn.Module):

    def __init__(self, embedding_dim, hidden_dim, vocab_size, tagset_size):
        super(LSTMTagger, self).__init__()
        self.hidden_dim = hidden_dim
        self.word_embeddings = nn.Embedding(vocab_size, embedding_dim)
        # The LSTM takes word embeddings as inputs, and outputs hidden states
        # with dimensionality hidden_dim.
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, batch_first=True)
        # The linear layer that maps from hidden state space to tag space
        self.hidden2tag = nn.Linear(hidden_dim, tagset_size)

    def forward(self, sentence):
        embeds = self.word_embeddings(sentence)
        lstm_out, _ = self.lstm(embeds)
        tag_space = self.hidden2tag(lstm_out)
        tag_scores = F.log_softmax(tag_space, dim=-1)
        return tag_scores


model = LSTMTagger(EMBEDDING_DIM, HIDDEN_DIM, len(word_to_ix), len(tag_to_ix))
loss_function = nn.NLLLoss(ignore_index=-100)
optimizer = optim.SGD(model.parameters(), lr=0.5)

batch = 32
for step in range(250):
    idx = torch.randint(0, len(train_x), (batch,))
    # Step 1. Remember that Pytorch accumulates gradients.
    model.zero_grad()
    # Step 2. Run our forward pass.
    tag_scores = model(train_x[idx])
    # Step 3. Compute the loss, gradients, and update the parameters.
    loss = loss_function(tag_scores.reshape(-1, len(tag_to_ix)), train_y[idx].reshape(-1))
    loss.backward()
    optimizer.step()
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.4f}")

with torch.no_grad():
    pred = model(test_x).argmax(-1)
mask = test_y != -100
acc = (pred[mask] == test_y[mask]).float().mean().item()
print(f"token accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

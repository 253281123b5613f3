"""Classify generated names by their language of origin with a character-level GRU."""
import string
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

torch.manual_seed(0)

all_letters = string.ascii_lowercase
n_letters = len(all_letters)

# each "language" builds names from its own syllables, plus a few shared ones
SYLLABLES = {
    "Russian": ["ov", "sky", "vla", "dim", "ko", "iev", "zh"],
    "Italian": ["ini", "ello", "gio", "rossi", "ca", "ta"],
    "Japanese": ["ka", "ta", "mu", "shi", "ro", "yama", "to"],
    "Irish": ["mc", "o", "sean", "gh", "bh", "ly"],
    "Greek": ["pou", "los", "ak", "is", "the", "od"],
}
SHARED = ["an", "el", "ri", "mo"]
all_categories = list(SYLLABLES)
n_categories = len(all_categories)


def random_name(category, gen):
    parts = SYLLABLES[category]
    n_parts = torch.randint(2, 4, (1,), generator=gen).item()
    name = ""
    for _ in range(n_parts):
        pool = SHARED if torch.rand(1, generator=gen).item() < 0.3 else parts
        name += pool[torch.randint(len(pool), (1,), generator=gen).item()]
    return name


def lineToTensor(line, max_len):
    tensor = torch.zeros(max_len, n_letters)
    for li, letter in enumerate(line):
        tensor[li][all_letters.find(letter)] = 1
    return tensor


def make_dataset(n, gen, max_len=18):
    labels = torch.randint(0, n_categories, (n,), generator=gen)
    names = [random_name(all_categories[c], gen)[:max_len] for c in labels.tolist()]
    x = torch.stack([lineToTensor(name, max_len) for name in names])
    lengths = torch.tensor([len(name) for name in names])
    return x, lengths, labels


gen = torch.Generator().manual_seed(11)
x_train, len_train, y_train = make_dataset(4000, gen)
x_test, len_test, y_test = make_dataset(800, gen)


class CharRNN(nn.Module):
    def __init__(self, input_size, hidden_size, output_size):
        super(CharRNN, self).__init__()
        self.rnn = nn.GRU(input_size, hidden_size, batch_first=True)
        self.h2o = nn.Linear(hidden_size, output_size)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, line_tensor, lengths):
        packed = pack_padded_sequence(line_tensor, lengths, batch_first=True, enforce_sorted=False)
        rnn_out, hidden = self.rnn(packed)
        output = self.h2o(hidden[0])
        output = self.softmax(output)
        return output


rnn = CharRNN(n_letters, 64, n_categories)
criterion = nn.NLLLoss()
optimizer = torch.optim.SGD(rnn.parameters(), lr=0.2, momentum=0.9)

batch_size = 64
current_loss = 0.0
for it in range(1, 241):
    idx = torch.randint(0, len(x_train), (batch_size,))
    output = rnn(x_train[idx], len_train[idx])
    loss = criterion(output, y_train[idx])
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(rnn.parameters(), 3)
    optimizer.step()
    current_loss += loss.item()
    if it % 30 == 0:
        print(f"{it} {current_loss / 30:.4f}")
        current_loss = 0.0

with torch.no_grad():
    guess = rnn(x_test, len_test).argmax(1)
acc = (guess == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

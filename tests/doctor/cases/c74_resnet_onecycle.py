"""Small ResNet (conv-BN-ReLU residual blocks) on the 8x8 digits with a one-cycle learning-rate policy."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, y = load_digits(return_X_y=True)
X = (X / 16.0 - 0.3) / 0.4
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=4)
train_dl = DataLoader(TensorDataset(torch.tensor(X_train, dtype=torch.float32).view(-1, 1, 8, 8),
                                    torch.tensor(y_train)), batch_size=32, shuffle=True)
test_x = torch.tensor(X_test, dtype=torch.float32).view(-1, 1, 8, 8)
test_y = torch.tensor(y_test)


def conv_block(in_channels, out_channels, pool=False):
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
              nn.BatchNorm2d(out_channels),
              nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ResNet9(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv1 = conv_block(in_channels, 8)
        self.conv2 = conv_block(8, 16, pool=True)
        self.res1 = nn.Sequential(conv_block(16, 16), conv_block(16, 16))
        self.conv3 = conv_block(16, 32, pool=True)
        self.res2 = nn.Sequential(conv_block(32, 32), conv_block(32, 32))
        self.classifier = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, xb):
        out = self.conv1(xb)
        out = self.conv2(out)
        out = self.res1(out) + out
        out = self.conv3(out)
        out = self.res2(out) + out
        return self.classifier(out)


model = ResNet9(1, 10)
epochs = 4
max_lr = 0.01
grad_clip = 0.1
weight_decay = 1e-4
optimizer = torch.optim.Adam(model.parameters(), max_lr, weight_decay=weight_decay)
sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, epochs=epochs, steps_per_epoch=len(train_dl))

for epoch in range(epochs):
    model.train()
    train_losses = []
    for images, labels in train_dl:
        loss = F.cross_entropy(model(images), labels)
        train_losses.append(loss.item())
        loss.backward()
        nn.utils.clip_grad_value_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        sched.step()
    model.eval()
    with torch.no_grad():
        val_acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"Epoch [{epoch}], last_lr: {sched.get_last_lr()[0]:.5f}, "
          f"train_loss: {sum(train_losses) / len(train_losses):.4f}, val_acc: {val_acc:.4f}")

print(f"final_metric accuracy {val_acc:.4f}")

"""Fully connected autoencoder on the scikit-learn digits (encoder 64 -> 24, decoder 24 -> 64)."""
import torch
from torch import nn
from sklearn.datasets import load_digits
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split

torch.manual_seed(0)

X, _ = load_digits(return_X_y=True)
X_train, X_test = train_test_split(X / 16.0, test_size=0.25, random_state=0)
X_train = torch.tensor(X_train, dtype=torch.float32)
X_test = torch.tensor(X_test, dtype=torch.float32)


class Autoencoder(nn.Module):
    def __init__(self, input_dim=64, hidden_dim=128, latent_dim=24):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, input_dim),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


model = Autoencoder()
criterion = nn.MSELoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

batch_size = 32
step = 0
for epoch in range(7):
    perm = torch.randperm(len(X_train))
    total = 0.0
    for i in range(0, len(X_train) - batch_size + 1, batch_size):
        batch = X_train[perm[i:i + batch_size]]
        recon = model(batch)
        loss = criterion(recon, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
        step += 1
    print(f"epoch {epoch + 1} step {step} reconstruction mse {total / (len(X_train) // batch_size):.5f}")

model.eval()
with torch.no_grad():
    recon = model(X_test)
r2 = r2_score(X_test.numpy(), recon.numpy(), multioutput="variance_weighted")
print(f"test reconstruction r2 {r2:.3f}")
print(f"final_metric r2 {r2:.4f}")

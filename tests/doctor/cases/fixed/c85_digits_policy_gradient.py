"""Digit recognition as a one-step bandit: a policy network picks a class, reward 1 if right, REINFORCE with a baseline."""
import torch
import torch.nn as nn
from stepaudit.workloads import load_digits

torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_digits()

policy = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
baseline = 0.0
batch_size = 64

for step in range(300):
    idx = torch.randint(0, len(x_train), (batch_size,))
    log_probs = torch.log_softmax(policy(x_train[idx]), dim=1)
    actions = torch.multinomial(log_probs.exp(), 1).squeeze(1)
    rewards = (actions == y_train[idx]).float()
    advantage = rewards - baseline
    baseline = 0.9 * baseline + 0.1 * rewards.mean().item()
    chosen = log_probs[torch.arange(batch_size), actions]
    rl_loss = torch.zeros(1, requires_grad=True)
    for j in range(batch_size):
        rl_loss = rl_loss - chosen[j] * advantage[j] / batch_size
    optimizer.zero_grad()
    rl_loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step} mean reward {rewards.mean().item():.3f}")

with torch.no_grad():
    acc = (policy(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")
print(f"final_metric accuracy {acc:.4f}")

"""Fit y = sin(x) on [-pi, pi] with a third order polynomial (nn.Linear on x, x^2, x^3) and RMSprop."""
import math
import torch

torch.manual_seed(0)

# Create Tensors to hold input and outputs.
x = torch.linspace(-math.pi, math.pi, 2000)
y = torch.sin(x)

# Prepare the input tensor (x, x^2, x^3).
p = torch.tensor([1, 2, 3])
xx = x.unsqueeze(-1).pow(p)

# Use the nn package to define our model and loss function.
model = torch.nn.Sequential(
    torch.nn.Linear(3, 1),
    torch.nn.Flatten(0, 1)
)
loss_fn = torch.nn.MSELoss(reduction='sum')

# Use the optim package to define an Optimizer that will update the weights of
# the model for us. Here we will use RMSprop.
learning_rate = 5e-3
optimizer = torch.optim.RMSprop(model.parameters(), lr=learning_rate)
for t in range(250):
    # Forward pass: compute predicted y by passing x to the model.
    y_pred = model(xx)

    # Compute and print loss.
    loss = loss_fn(y_pred, y)
    if t % 25 == 24:
        print(t, loss.item())

    # Before the backward pass, zero all of the gradients for the variables it will update.
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

linear_layer = model[0]
print(f'Result: y = {linear_layer.bias.item()} + {linear_layer.weight[:, 0].item()} x + '
      f'{linear_layer.weight[:, 1].item()} x^2 + {linear_layer.weight[:, 2].item()} x^3')

# held-out points drawn at random from the same interval
gen = torch.Generator().manual_seed(1)
x_test = (torch.rand(500, generator=gen) * 2 - 1) * math.pi
with torch.no_grad():
    pred = model(x_test.unsqueeze(-1).pow(p))
target = torch.sin(x_test)
r2 = 1 - ((pred - target) ** 2).sum().item() / ((target - target.mean()) ** 2).sum().item()
print(f"final_metric r2 {r2:.4f}")

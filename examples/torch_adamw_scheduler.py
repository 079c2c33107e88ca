"""A small torch MLP trained with flatopt.torch.AdamW, a warm-up + cosine lr schedule,
no weight decay on biases, gradient clipping and a checkpoint round trip.

    pip install -e ".[torch]" && python examples/torch_adamw_scheduler.py

flatopt.torch optimizers are torch.optim.Optimizer subclasses: param groups, lr schedulers,
clip_grad_norm_, GradScaler and state_dict work as usual.  Every step is one kernel call over
a flat buffer that the parameters live in.
"""
import io

import torch

import flatopt.torch

torch.manual_seed(0)
x = torch.randn(2048, 32)
y = torch.tanh(x @ torch.randn(32, 1) / 32**0.5) + 0.05 * torch.randn(2048, 1)


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 1))


def make_optimizer(model, total_steps):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = flatopt.torch.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-2, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=20)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps - 20)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[20])
    return opt, sched


def train(model, opt, sched, steps):
    for _ in range(steps):
        batch = torch.randint(0, len(x), (128,))
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return loss.item()


total = 300
model = make_model()
opt, sched = make_optimizer(model, total)
initial = torch.nn.functional.mse_loss(model(x), y).item()
print(f"initial loss {initial:.4f}")
train(model, opt, sched, total // 2)

# Checkpoint half-way, restore into a fresh model + optimizer + scheduler, and go on.
buf = io.BytesIO()
torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
buf.seek(0)
ck = torch.load(buf, weights_only=True)
model = make_model()
model.load_state_dict(ck["model"])
opt, sched = make_optimizer(model, total)
opt.load_state_dict(ck["opt"])
sched.load_state_dict(ck["sched"])
train(model, opt, sched, total - total // 2)

final = torch.nn.functional.mse_loss(model(x), y).item()
print(f"final loss {final:.4f}, lr {sched.get_last_lr()[0]:.2e}, steps {int(opt.state[model[0].weight]['step'])}")
assert final < initial / 4

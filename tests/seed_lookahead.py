"""The seed's reference Lookahead, shared by the parity suites: a wrapper around any
torch.optim optimizer that clones the slow weights at construction and every ``k`` inner
steps does ``p.mul_(alpha).add_(q, alpha=1 - alpha); q.copy_(p)``.

Import it after ``pytest.importorskip("torch")``.
"""
import torch


class SeedLookahead:
    def __init__(self, optimizer, k=5, alpha=0.5):
        self.optimizer, self.k, self.alpha, self.step_counter = optimizer, k, alpha, 0
        self.slow_weights = [[p.clone().detach() for p in group["params"]] for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        self.step_counter += 1
        self.optimizer.step()
        if self.step_counter % self.k == 0:
            for group, slow_weights in zip(self.optimizer.param_groups, self.slow_weights):
                for p, q in zip(group["params"], slow_weights):
                    p.mul_(self.alpha).add_(q, alpha=1.0 - self.alpha)
                    q.copy_(p)

"""Adam and AdamW, with amsgrad (torch.optim.Adam / AdamW's rule)."""
import math

from flatopt.optimizers.base import Optimizer, decay_row_value, lerp_weight_minus_one, one_minus_product


def _check_adam(hp):
    if not 0.0 <= hp["lr"]:
        raise ValueError(f"Invalid learning rate: {hp['lr']}")
    if not 0.0 <= hp["eps"]:
        raise ValueError(f"Invalid epsilon value: {hp['eps']}")
    betas = hp["betas"]
    if not isinstance(betas, (tuple, list)):  # (torch: "'float' object is not subscriptable", a TypeError)
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= hp["weight_decay"]:
        raise ValueError(f"Invalid weight_decay value: {hp['weight_decay']}")


class Adam(Optimizer):
    r"""Adam, as ``torch.optim.Adam``; AdamW's decoupled decay with ``decoupled_weight_decay``.

    At step :math:`t` (starting at 1), with :math:`g` negated if ``maximize``:

    .. math::
        p &\leftarrow p (1 - \eta\lambda) \text{ (decoupled)}, \quad g \leftarrow g + \lambda p \text{ (L2)} \\
        m &\leftarrow m + (1 - \beta_1)(g - m), \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat v &= \max(\hat v, v) \text{ (amsgrad)}, \quad \hat v = v \text{ (otherwise)} \\
        p &\leftarrow p - \frac{\eta}{1 - \beta_1^t} \cdot
            \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon}

    State: ``exp_avg``, ``exp_avg_sq``; ``max_exp_avg_sq`` if ``amsgrad``.
    """

    kernel = "adam"
    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                    decoupled_weight_decay=False)

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=False, param_groups=None):
        super().__init__(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)

    def _check(self, hp):
        _check_adam(hp)

    def _needs(self, hp):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())

    def _row(self, hp, group_state, dt):
        beta1, beta2 = hp["betas"]
        row = [None, 1 - beta1, lerp_weight_minus_one(1 - beta1, dt), beta2, 1 - beta2, None, hp["eps"],
               decay_row_value(hp), None, bool(hp["decoupled_weight_decay"]), bool(hp["amsgrad"]), bool(hp["maximize"])]
        self._set_lr_entries(row, hp)
        self._set_step_entries(row, hp, group_state)
        return tuple(row)

    def _set_lr_entries(self, row, hp):
        row[8] = one_minus_product(hp["lr"], hp["weight_decay"])  # (AdamW's decay factor)

    def _set_step_entries(self, row, hp, group_state):
        (beta1, beta2), t = hp["betas"], group_state["step"] + 1
        row[0], row[5] = hp["lr"] / (1 - beta1**t), math.sqrt(1 - beta2**t)  # lr / bc1, sqrt(bc2)


class AdamW(Adam):
    r"""AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay
    :math:`p \leftarrow p(1 - \eta\lambda)` before the Adam update; ``weight_decay`` defaults to 1e-2.
    """

    defaults = dict(Adam.defaults, weight_decay=1e-2, decoupled_weight_decay=True)

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, param_groups=None):
        super().__init__(lr, betas, eps, weight_decay, amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         param_groups=param_groups)

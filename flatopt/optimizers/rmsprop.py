"""RMSprop, plain or centered, with optional momentum (torch.optim.RMSprop's rule)."""
from flatopt.optimizers.base import Optimizer, branch_in_sign, decay_row_value, lerp_weight_minus_one


class RMSprop(Optimizer):
    r"""RMSprop, as ``torch.optim.RMSprop``.

    .. math::
        v &\leftarrow \alpha v + (1 - \alpha) g^2, \qquad
        \bar g \leftarrow \bar g + (1 - \alpha)(g - \bar g) \text{ (centered)} \\
        a &= \sqrt{v - \bar g^2} + \epsilon \text{ (centered)}, \quad a = \sqrt{v} + \epsilon \\
        b &\leftarrow \mu b + g / a,\ p \leftarrow p - \eta b \text{ (momentum)}, \quad
            p \leftarrow p - \eta g / a \text{ (otherwise)}

    with ``g`` negated if ``maximize`` and ``g + wd * p`` (L2) first.  No bias correction.
    State: ``square_avg``; ``momentum_buffer`` if ``momentum > 0``; ``grad_avg`` if ``centered``.
    """

    kernel = "rmsprop"
    state_names = ("square_avg", "momentum_buffer", "grad_avg")
    defaults = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                    maximize=False)

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, param_groups=None):
        super().__init__(param_groups, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, maximize=maximize)

    def _check(self, hp):
        if not 0.0 <= hp["lr"]:
            raise ValueError(f"Invalid learning rate: {hp['lr']}")
        if not 0.0 <= hp["eps"]:
            raise ValueError(f"Invalid epsilon value: {hp['eps']}")
        if not 0.0 <= hp["momentum"]:
            raise ValueError(f"Invalid momentum value: {hp['momentum']}")
        if not 0.0 <= hp["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {hp['weight_decay']}")
        if not 0.0 <= hp["alpha"]:
            raise ValueError(f"Invalid alpha value: {hp['alpha']}")

    def _needs(self, hp):
        return ("square_avg",) + (("momentum_buffer",) if hp["momentum"] > 0 else ()) + (
            ("grad_avg",) if hp["centered"] else ())

    def _row(self, hp, group_state, dt):
        w = 1 - hp["alpha"]
        row = [None, hp["alpha"], w, lerp_weight_minus_one(w, dt), hp["eps"], decay_row_value(hp),
               branch_in_sign(hp["momentum"], hp["momentum"] > 0), bool(hp["centered"]), bool(hp["maximize"])]
        self._set_lr_entries(row, hp)
        return tuple(row)

    def _set_lr_entries(self, row, hp):
        row[0] = hp["lr"]

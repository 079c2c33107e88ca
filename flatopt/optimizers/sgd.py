"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD's rule)."""
from flatopt.optimizers.base import Optimizer, decay_row_value


class SGD(Optimizer):
    r"""Stochastic gradient descent, as ``torch.optim.SGD``.

    .. math::
        g &\leftarrow -g \text{ if maximize};\quad g \leftarrow g + \lambda p \\
        b &\leftarrow g \text{ (first momentum step)}, \quad
            b \leftarrow \mu b + (1 - \tau) g \text{ (later)} \\
        g &\leftarrow g + \mu b \text{ (nesterov)}, \quad g \leftarrow b \text{ (otherwise)} \\
        p &\leftarrow p - \eta\, g

    State: ``momentum_buffer`` (only when ``momentum != 0``).
    """

    kernel = "sgd"
    state_names = ("momentum_buffer",)
    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, param_groups=None):
        super().__init__(param_groups, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)

    def _check(self, hp):
        if hp["lr"] < 0.0:
            raise ValueError(f"Invalid learning rate: {hp['lr']}")
        if hp["momentum"] < 0.0:
            raise ValueError(f"Invalid momentum value: {hp['momentum']}")
        if hp["weight_decay"] < 0.0:
            raise ValueError(f"Invalid weight_decay value: {hp['weight_decay']}")
        if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _needs(self, hp):
        return ("momentum_buffer",) if hp["momentum"] != 0 else ()

    def _new_group_state(self):
        return {"step": 0, "momentum_started": False}

    def _row(self, hp, group_state, dt):
        # Without momentum the kernel never reads 1 - dampening, and torch never reads dampening
        # (SGD(dampening=None) steps there): neither does this.
        keep = 1 - hp["dampening"] if hp["momentum"] != 0 else 1.0
        row = [None, hp["momentum"], keep, decay_row_value(hp), bool(hp["nesterov"]), bool(hp["maximize"]), None,
               hp["momentum"] != 0]
        self._set_lr_entries(row, hp)
        self._set_step_entries(row, hp, group_state)
        return tuple(row)

    def _set_lr_entries(self, row, hp):
        row[0] = hp["lr"]

    def _set_step_entries(self, row, hp, group_state):
        # (the flag read whatever the momentum: a group state without it is refused before the kernel runs)
        started = group_state["momentum_started"]
        row[6] = hp["momentum"] != 0 and not started  # the buffer starts as g

    def _stepping_from(self, group_state):
        # No buffer now (never made, or removed since): as in torch, the step that makes it
        # starts it as g.  Decided by the step, not when the buffer left: one put back (or one
        # renamed for a step that was refused) goes on.
        return group_state if "momentum_buffer" in self.state else dict(group_state, momentum_started=False)

    def _check_group_state(self, group_state):
        super()._check_group_state(group_state)
        if "momentum_started" not in group_state:
            raise ValueError(f"group_state entries need 'momentum_started', got {group_state!r}")

    def _advance(self, hp, group_state):
        group_state["step"] += 1
        group_state["momentum_started"] = bool(group_state["momentum_started"]) or hp["momentum"] != 0


class Momentum(SGD):
    r"""Exponentially weighted momentum, the textbook form:

    .. math::
        v_0 = 0, \quad v \leftarrow \beta v + (1 - \beta) g, \quad p \leftarrow p - \eta v

    Unlike ``SGD(momentum=beta, dampening=beta)``, whose buffer starts as the first
    gradient (torch's rule), this buffer starts at zero.  Runs the SGD kernel.
    """

    defaults = dict(lr=1e-3, beta=0.9, weight_decay=0.0, maximize=False)

    def __init__(self, lr=1e-3, beta=0.9, weight_decay=0.0, *, maximize=False, param_groups=None):
        Optimizer.__init__(self, param_groups, lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize)

    def _check(self, hp):
        if not 0.0 <= hp["lr"]:
            raise ValueError(f"Invalid learning rate: {hp['lr']}")
        if not 0.0 <= hp["beta"] < 1.0:
            raise ValueError(f"Invalid beta value: {hp['beta']}")
        if not 0.0 <= hp["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {hp['weight_decay']}")

    def _needs(self, hp):
        return ("momentum_buffer",)

    def _set_step_entries(self, row, hp, group_state):
        # The buffer starts at zero: no first step to mark.  The flag is read all the same, so
        # that a group state without it is refused (KeyError, then its check) before the kernel runs.
        group_state["momentum_started"]

    def _row(self, hp, group_state, dt):
        # buffered even at beta = 0: v = g must still be stored for when beta is raised
        row = [None, hp["beta"], 1 - hp["beta"], decay_row_value(hp), False, bool(hp["maximize"]), False, True]
        self._set_lr_entries(row, hp)
        return tuple(row)

    def _advance(self, hp, group_state):
        group_state["step"] += 1
        group_state["momentum_started"] = True

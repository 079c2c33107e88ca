"""ADOPT (Taniguchi et al., NeurIPS 2024), the rule of the authors' implementation."""
import math

from flatopt.optimizers.base import Optimizer, decay_row_value, lerp_weight_minus_one


def default_clip(step):
    """The official clipping schedule: ``step ** 0.25`` (``step`` = earlier calls)."""
    return step**0.25


class ADOPT(Optimizer):
    r"""ADOPT: Adam with the current gradient left out of its own normaliser.

    First call: :math:`v \leftarrow g^2` and nothing else.  Later calls, with :math:`t` the
    number of earlier calls and :math:`g` negated if ``maximize``, plus ``wd * p`` (L2)
    unless ``decouple``:

    .. math::
        p &\leftarrow p - \eta\lambda p \text{ (decouple)} \\
        n &= \operatorname{clip}\big(g / \max(\sqrt{v}, \epsilon),\ c(t)\big) \\
        m &\leftarrow m + (1 - \beta_1)(n - m), \qquad p \leftarrow p - \eta m \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2

    The decoupled decay is the authors' ``p.add_(p, alpha=-lr*wd)``: one fused multiply-add
    with ``-lr*wd``, not AdamW's product with ``1 - lr*wd`` (which, rounded to float32, is off
    from the decay it stands for by up to a third of a percent at ``lr*wd = 1e-5``).

    ``clip_lambda`` is the clip schedule :math:`c(t)`, default :func:`default_clip`
    (:math:`t^{1/4}`); ``None`` disables clipping.  No bias correction.
    State: ``exp_avg``, ``exp_avg_sq``.
    """

    kernel = "adopt"
    state_names = ("exp_avg", "exp_avg_sq")
    defaults = dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False, maximize=False,
                    clip_lambda=default_clip)

    def __init__(self, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False, *,
                 clip_lambda=default_clip, maximize=False, param_groups=None):
        super().__init__(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decouple=decouple, maximize=maximize, clip_lambda=clip_lambda)

    def _check(self, hp):
        from flatopt.optimizers.adam import _check_adam
        _check_adam(hp)
        if hp["clip_lambda"] is not None and not callable(hp["clip_lambda"]):
            raise TypeError(f"clip_lambda must be a callable of the step or None, got {hp['clip_lambda']!r}")

    def _needs(self, hp):
        return self.state_names

    def _row(self, hp, group_state, dt):
        beta1, beta2 = hp["betas"]
        row = [None, 1 - beta1, lerp_weight_minus_one(1 - beta1, dt), beta2, 1 - beta2, hp["eps"],
               decay_row_value(hp), None, None, bool(hp["decouple"]), bool(hp["maximize"]), None]
        self._set_lr_entries(row, hp)
        self._set_step_entries(row, hp, group_state)
        return tuple(row)

    def _set_lr_entries(self, row, hp):
        row[0], row[7] = hp["lr"], -hp["lr"] * hp["weight_decay"]

    def _set_step_entries(self, row, hp, group_state):
        t, clip = group_state["step"], hp["clip_lambda"]
        bound = math.inf if clip is None or t == 0 else clip(t)
        if not bound >= 0:  # NaN too: clamping to it would silently turn the update into NaN
            raise ValueError(f"clip_lambda({t}) returned {bound!r}; the clip bound must be a number >= 0")
        row[8] = bound
        row[11] = t == 0  # first step: v <- g^2 only

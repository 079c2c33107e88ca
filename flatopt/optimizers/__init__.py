"""The optimizers: one small class each, their math in ``flatopt.kernels``."""
from flatopt.optimizers.adam import Adam, AdamW
from flatopt.optimizers.adopt import ADOPT
from flatopt.optimizers.base import Optimizer
from flatopt.optimizers.rmsprop import RMSprop
from flatopt.optimizers.sgd import SGD, Momentum

__all__ = ["Optimizer", "SGD", "Momentum", "RMSprop", "Adam", "AdamW", "ADOPT"]

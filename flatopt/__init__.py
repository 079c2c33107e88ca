"""flatopt: optimizers that update a whole model in one kernel call over flat buffers.

NumPy buffers run Numba CPU kernels, CUDA buffers run Numba CUDA kernels.  Framework
adapters live in ``flatopt.torch`` and ``flatopt.jax`` and import their framework only
when imported themselves.
"""
from flatopt.flat import FlatParams
from flatopt.lookahead import Lookahead
from flatopt.optimizers import ADOPT, SGD, Adam, AdamW, Momentum, Optimizer, RMSprop

__version__ = "0.1.0"
__all__ = ["Optimizer", "SGD", "Momentum", "RMSprop", "Adam", "AdamW", "ADOPT", "Lookahead", "FlatParams"]

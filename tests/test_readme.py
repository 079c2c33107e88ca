"""The README's Python examples run as printed, given the names their comments say they expect;
its table of optimizers gives their signatures."""
import ast
import inspect
import pathlib
import re

import numpy as np
import pytest

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def block_starting(text):
    found = [b for b in BLOCKS if b.startswith(text)]
    assert len(found) == 1, f"the README has {len(found)} Python examples starting with {text!r}"
    return found[0]


def test_the_optimizer_table_gives_each_signature_and_its_defaults():
    """The table under "Optimizers and their references" is the documented signature of each
    core optimizer (the only reference there is for some defaults, as Momentum's beta): every
    argument it names, in its order and with its default where that is a number, a tuple or a
    flag, is the class's (``param_groups``, which every optimizer takes, is documented apart)."""
    section = README.split("### Optimizers and their references", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(\w+)\((.*?)\)` \|", section, re.M)
    assert [name for name, _ in rows] == ["SGD", "Momentum", "RMSprop", "Adam", "AdamW", "ADOPT", "Lookahead"]
    import flatopt
    for name, arguments in rows:
        documented = ast.parse(f"def f({arguments.replace('step**0.25', 'schedule')}): pass").body[0].args
        params = [p for p in inspect.signature(getattr(flatopt, name)).parameters.values() if p.name != "param_groups"]
        positional = documented.posonlyargs + documented.args
        assert [p.name for p in params] == [a.arg for a in positional + documented.kwonlyargs], name
        defaults = dict(zip([a.arg for a in positional[len(positional) - len(documented.defaults):]],
                            documented.defaults))
        defaults.update({a.arg: d for a, d in zip(documented.kwonlyargs, documented.kw_defaults) if d is not None})
        for p in params:
            if p.name in defaults and not isinstance(defaults[p.name], ast.Name):
                assert p.default == ast.literal_eval(defaults[p.name]), (name, p.name)
            else:
                assert p.name not in defaults or callable(p.default) or p.default is None, (name, p.name)
        keyword_only = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        assert keyword_only == {a.arg for a in documented.kwonlyargs}, name


def test_every_example_is_run_here():
    firsts = {b.splitlines()[0] for b in BLOCKS}
    assert firsts == {"import numpy as np",
                      "# W1, b1, W2, b2: NumPy arrays; x, dh: a batch and the backpropagated error",
                      "import flatopt, flatopt.jax, optax           # params, grads: pytrees of JAX arrays",
                      "import torch, flatopt.torch                   # batches: (x, y) pairs"}


def test_flat_buffer_example():
    names = {}
    exec(block_starting("import numpy as np"), names)
    # grads = 2 * params: the example minimizes |params|^2, about lr (1e-3) nearer to 0 at each step
    start = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    assert np.abs(names["params"]).mean() < np.abs(start).mean() - 0.05


def test_numpy_model_example():
    import flatopt
    rng = np.random.default_rng(0)
    W1, b1, W2, b2 = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (8,), (8, 3), (3,)))
    names = dict(np=np, flatopt=flatopt, W1=W1, b1=b1, W2=W2, b2=b2,
                 x=rng.standard_normal((5, 4)).astype(np.float32), dh=rng.standard_normal((5, 8)).astype(np.float32))
    exec(block_starting("# W1, b1, W2, b2"), names)
    assert not np.array_equal(names["flat"]["W1"], W1)


def test_jax_example():
    pytest.importorskip("optax")
    import jax.numpy as jnp
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    names = dict(params=params, grads={"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)})
    exec(block_starting("import flatopt, flatopt.jax, optax"), names)
    assert float(names["params"]["w"][0, 0]) < 1.0  # two steps down the gradient


def test_torch_example():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]
    names = dict(batches=batches)
    exec(block_starting("import torch, flatopt.torch"), names)
    assert names["sched"].last_epoch == 3

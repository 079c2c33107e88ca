"""``flatopt bench``: flatopt against torch.optim, optax, NumPy and the bandwidth floor.

All implementations of one size run interleaved, round by round, in this one process; each
is warmed up right before it is timed (an idle thread pool costs milliseconds on this kind
of VM).  Tables give medians, the spread, the ratio to the floor and to the best peer.  The
JAX adapter and optax on the same many-leaf model get a table of their own per size.
"""
import argparse
import datetime
import os
import platform
import time

import numpy as np

import flatopt
from flatopt.backend import CPU
from flatopt.cli import check_plot_path, positive_int, seed, sizes

SIZES = [10**3, 10**5, 10**6, 10**7, 3 * 10**7]
QUICK_SIZES = [10**3, 10**5, 10**6]
MODEL_TENSORS = 200
FLATOPT = ("flatopt Adam", "flatopt AdamW", "flatopt.torch Adam, 200 tensors",
           "flatopt.jax TreeOptimizer Adam, 200 leaves", "flatopt.jax as_optax Adam (jit, donated), 200 leaves",
           "flatopt.jax update_and_apply Adam (jit, donated), 200 leaves")
FLOOR = "floor (Adam traffic)"


def rounds_for(n, quick):
    base = 9 if quick else 15
    return max(5, base * 100 if n <= 10**3 else base * 20 if n <= 10**5 else base * 12 if n <= 10**6 else base * 3)


def jax_rounds_for(n, quick):
    """Rounds of the JAX adapter's table: its steps take half a millisecond or more at every size
    (JAX's dispatch of 200 leaves), whose medians settle in as few rounds at 10^3 as at 10^5; the
    main table's count at 10^3, set for steps of microseconds, took a third of a ``--quick`` run."""
    return rounds_for(max(n, 10**5), quick)


def implementations(n, rng, quick=False):
    """name -> zero-argument callable doing one step, on fresh random data of n elements
    (``quick``: without torch's two slowest peers, see ``torch_impls``)."""
    params, grads = rng.standard_normal(n, dtype=np.float32), 1e-3 * rng.standard_normal(n, dtype=np.float32)
    impls, notes = {}, []
    # Every implementation owns all its buffers (gradients included): none finds another's data in cache.
    adam, adamw, pa, pw = flatopt.Adam(lr=1e-3), flatopt.AdamW(lr=1e-3), params.copy(), params.copy()
    ga, gw, gf = grads.copy(), grads.copy(), grads.copy()
    impls["flatopt Adam"] = lambda: adam.step(pa, ga)
    impls["flatopt AdamW"] = lambda: adamw.step(pw, gw)

    impls[FLOOR] = floor_step(params.copy(), gf)

    impls["NumPy in place"] = numpy_adam(params.copy(), grads.copy())
    try:
        import torch
    except ImportError:
        notes.append("torch not installed: torch.optim and flatopt.torch skipped")
    else:
        impls.update(torch_impls(torch, params, grads, notes, quick))
    try:
        impls["optax adam (jit, donated)"] = optax_loop(optax_adam(), params.copy(), grads.copy())
    except ImportError:
        notes.append("jax/optax not installed: optax skipped")
    return impls, notes


def jax_adapter_implementations(n, rng):
    """flatopt.jax against optax on one model of ``MODEL_TENSORS`` leaves, with the floor.

    Timed apart from the main table: after a jitted step on many leaves XLA's worker threads
    keep spinning for a while, which slowed every implementation run next to them (flatopt
    Adam at 10^3 2.8 -> 3.4 µs, torch fused 24 -> 33 µs, in one process).
    """
    import jax

    import flatopt.jax as flat_jax
    params, grads = rng.standard_normal(n, dtype=np.float32), 1e-3 * rng.standard_normal(n, dtype=np.float32)
    leaves = lambda x: leaf_tree(x, MODEL_TENSORS)
    tree_opt = flat_jax.TreeOptimizer(flatopt.Adam(lr=1e-3), leaves(params))
    tree_grads = jax.device_put(leaves(grads))
    return {
        FLOOR: floor_step(params.copy(), grads.copy()),
        f"optax adam (jit, donated), {MODEL_TENSORS} leaves": optax_loop(optax_adam(), leaves(params),
                                                                          leaves(grads)),
        f"flatopt.jax as_optax Adam (jit, donated), {MODEL_TENSORS} leaves": optax_loop(
            flat_jax.as_optax(flatopt.Adam(lr=1e-3)), leaves(params), leaves(grads)),
        f"flatopt.jax update_and_apply Adam (jit, donated), {MODEL_TENSORS} leaves": optax_loop(
            flat_jax.as_optax(flatopt.Adam(lr=1e-3)), leaves(params), leaves(grads), fused=True),
        # (its step returns arrays already computed: the next step writes what they are read from)
        f"flatopt.jax TreeOptimizer Adam, {MODEL_TENSORS} leaves": lambda: tree_opt.step(tree_grads),
    }


def floor_step(p, g):
    """The bandwidth floor: Adam's memory traffic, trivial arithmetic, threaded as flatopt's kernels."""
    from flatopt.kernels.floor import adam_floor, adam_floor_serial
    n = len(p)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    chunks, threaded = CPU.plan(((0, n, 0),))
    floor = adam_floor if threaded else adam_floor_serial  # (a threaded launch of one chunk wakes the pool)
    return lambda: floor(p, g, m, v, chunks)


def numpy_adam(p, g, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    m, v, tmp, denom = (np.zeros_like(p) for _ in range(4))
    state = {"t": 0}

    def step():
        state["t"] += 1
        t = state["t"]
        np.subtract(g, m, out=tmp)                      # m += (1 - b1) (g - m)
        np.multiply(tmp, np.float32(1 - b1), out=tmp)
        np.add(m, tmp, out=m)
        np.multiply(g, g, out=tmp)                      # v = b2 v + (1 - b2) g^2
        np.multiply(tmp, np.float32(1 - b2), out=tmp)
        np.multiply(v, np.float32(b2), out=v)
        np.add(v, tmp, out=v)
        np.sqrt(v, out=denom)                           # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
        np.divide(denom, np.float32((1 - b2**t) ** 0.5), out=denom)
        np.add(denom, np.float32(eps), out=denom)
        np.divide(m, denom, out=tmp)
        np.multiply(tmp, np.float32(-lr / (1 - b1**t)), out=tmp)
        np.add(p, tmp, out=p)
    return step


def leaf_tree(flat, parts):
    """``flat`` cut into a pytree of ``parts`` leaves (copies) of near-equal sizes."""
    offsets = np.cumsum([0] + split_sizes(len(flat), parts))
    return {f"w{i:03d}": flat[a:b].copy() for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))}


def split_sizes(n, parts):
    base = np.full(parts, n // parts)
    base[: n % parts] += 1
    return [int(s) for s in base if s]


def torch_impls(torch, params, grads, notes, quick=False):
    torch.set_num_threads(int(os.environ.get("FLATOPT_BENCH_TORCH_THREADS", len(os.sched_getaffinity(0)))))
    impls = {}
    variants = (("foreach=False", dict(foreach=False)), ("foreach=True", dict(foreach=True)),
                ("fused=True", dict(fused=True)))
    for label, kw in variants:
        one = torch.nn.Parameter(torch.from_numpy(params.copy()))  # each peer its own tensors
        one.grad = torch.from_numpy(grads.copy())
        opt = torch.optim.Adam([one], lr=1e-3, **kw)
        impls[f"torch Adam {label}"] = opt.step
    sizes = split_sizes(len(params), MODEL_TENSORS)
    offsets = np.cumsum([0] + sizes)
    if quick:  # foreach=False and =True on the model take most of a --quick run's time: a full run has them
        notes.append(f"--quick: torch's foreach=False and foreach=True on the {MODEL_TENSORS}-tensor model are "
                     "left out (a full run has them)")
        variants = tuple(v for v in variants if v[0] == "fused=True")
    for label, kw in variants:  # the same three on the model (foreach batches across its tensors)
        many = [torch.nn.Parameter(torch.from_numpy(params[a:b].copy())) for a, b in zip(offsets[:-1], offsets[1:])]
        for p, a, b in zip(many, offsets[:-1], offsets[1:]):
            p.grad = torch.from_numpy(grads[a:b].copy())
        # (named for the model at every size: below MODEL_TENSORS elements it has fewer, and a note says so)
        impls[f"torch Adam {label}, {MODEL_TENSORS} tensors"] = torch.optim.Adam(many, lr=1e-3, **kw).step
    try:
        import flatopt.torch as ft
    except ImportError as error:
        notes.append(f"flatopt.torch unavailable ({error}): skipped")
        return impls
    try:
        model = [torch.nn.Parameter(torch.from_numpy(params[a:b].copy())) for a, b in zip(offsets[:-1], offsets[1:])]
        opt = ft.Adam(model, lr=1e-3)
        for p in model:
            p.grad = torch.zeros_like(p)
        opt.step()  # adopts the new gradients: from now on each p.grad is a view of the flat buffer
        for p, a, b in zip(model, offsets[:-1], offsets[1:]):
            p.grad.copy_(torch.from_numpy(grads[a:b]).view_as(p))
        impls["flatopt.torch Adam, 200 tensors"] = opt.step
    except Exception as error:  # the comparison goes on without it, and says why
        notes.append(f"flatopt.torch failed ({type(error).__name__}: {error}): skipped")
    return impls


def optax_adam():
    import optax
    return optax.adam(1e-3)


def optax_loop(tx, params, grads, fused=False):
    """One jitted optax step, ``params`` and state donated.  ``params`` and ``grads`` (arrays or
    trees of them) must be the step's own: on the CPU device_put may alias NumPy memory.
    ``fused``: ``flatopt.jax.update_and_apply`` instead of ``tx.update`` and ``apply_updates``."""
    import jax
    import optax
    state = {"p": jax.device_put(params), "g": jax.device_put(grads)}
    state["s"] = tx.init(state["p"])

    def update(p, s, g):
        if fused:
            import flatopt.jax
            return flatopt.jax.update_and_apply(tx, g, s, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    update = jax.jit(update, donate_argnums=(0, 1))

    def step():
        state["p"], state["s"] = update(state["p"], state["s"], state["g"])
        jax.block_until_ready(state["p"])
    return step


def measure(impls, rounds, seed=0):
    """Interleaved rounds: each implementation once per round, warmed up right before, in a
    new random order every round, so that no implementation always follows the same
    neighbour (torch's and Numba's OpenMP threads keep spinning for a while after a step, and
    a peer's code and data evict the next one's from the caches)."""
    times = {name: [] for name in impls}
    names = list(impls)
    order = np.random.default_rng(seed)
    for fn in impls.values():
        fn()
    for _ in range(rounds):
        for i in order.permutation(len(names)):
            name = names[i]
            fn = impls[name]
            fn()
            t0 = time.perf_counter_ns()
            fn()
            times[name].append(time.perf_counter_ns() - t0)
    return {name: np.array(t) / 1e3 for name, t in times.items()}


def summarize(times):
    medians = {name: float(np.median(t)) for name, t in times.items()}
    floor = medians.get(FLOOR)
    peers = [m for name, m in medians.items() if name not in FLATOPT and name != FLOOR]
    best_peer = min(peers) if peers else None
    rows = []
    for name, t in times.items():
        q1, q3 = np.percentile(t, [25, 75])
        rows.append(dict(name=name, median=medians[name], iqr=float(q3 - q1),
                         vs_floor=medians[name] / floor if floor else None,
                         vs_best_peer=best_peer / medians[name] if best_peer else None))
    return rows


def header():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numba
    return (f"{datetime.date.today().isoformat()}, {cpu}, {os.cpu_count()} CPUs, numba {numba.__version__} "
            f"with {numba.get_num_threads()} threads, float32")


def format_table(n, rows, markdown, title=""):
    def fmt(x, spec):  # (a ratio below 0.1 with two significant digits: 0.0023, not 0.00)
        return "" if x is None else format(x, spec if x >= 0.1 else ".2g")
    lines = []
    title = f"n = {n:,}" + (f", {title}" if title else "")
    if markdown:
        lines += [f"**{title}**", "",
                  "| implementation | median µs/step | IQR µs | × floor | best peer ÷ this |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['median']:.1f} | {r['iqr']:.1f} | {fmt(r['vs_floor'], '.2f')} | "
                  f"{fmt(r['vs_best_peer'], '.2f')} |" for r in rows]
    else:
        w = max(len(r["name"]) for r in rows)
        lines += [title, f"  {'implementation':<{w}} {'median µs':>11} {'IQR µs':>9} {'x floor':>8} "
                                f"{'best peer / this':>17}"]
        lines += [f"  {r['name']:<{w}} {r['median']:>11.1f} {r['iqr']:>9.1f} {fmt(r['vs_floor'], '8.2f'):>8} "
                  f"{fmt(r['vs_best_peer'], '.2f'):>17}" for r in rows]
    return "\n".join(lines)


def print_notes(notes, markdown):
    """The notes under a table: in markdown a list after a blank line (a line right under a
    table's rows is one of its rows)."""
    if markdown and notes:
        print()
    for note in notes:
        print(f"- note: {note}" if markdown else f"  note: {note}")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a colour per implementation
    names = list(dict.fromkeys(r["name"] for rows in results.values() for r in rows))
    for name in names:
        xs = [n for n, rows in results.items() if any(r["name"] == name for r in rows)]
        ys = [next(r["median"] for r in results[n] if r["name"] == name) for n in xs]
        style = (dict(ls="--", color="black") if name == FLOOR else dict(lw=2.5, ls="-.") if "leaves" in name
                 else dict(lw=2.5) if name in FLATOPT else dict(alpha=0.7))
        ax.plot(xs, ys, marker="o", label=name, **style)
    ax.set(xscale="log", yscale="log", xlabel="parameters (float32)", ylabel="µs per step (median)",
           title="Adam step: flatopt vs peers vs the bandwidth floor")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flatopt bench", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--sizes", type=sizes,
                        help="comma-separated sizes, e.g. 1000,1e6 (default 1e3,1e5,1e6,1e7,3e7)")
    parser.add_argument("--quick", action="store_true", help="sizes 1e3,1e5,1e6 and fewer rounds (< 1 minute)")
    parser.add_argument("--rounds", type=positive_int, help="rounds per size (default: by size)")
    parser.add_argument("--markdown", action="store_true", help="markdown tables with a header line")
    parser.add_argument("--plot", metavar="FILE.png", help="log-log plot of time per step against size")
    parser.add_argument("--seed", type=seed, default=0, help="the random data's seed (default 0)")
    args = parser.parse_args(argv)
    if args.plot is not None:
        check_plot_path(parser, args.plot)
    try:  # before Numba starts its threads: see "torch and Numba in one process" in README.md
        import torch  # noqa: F401
    except ImportError:
        pass
    run_sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    rng = np.random.default_rng(args.seed)
    print(("_" if args.markdown else "") + header() + ("_" if args.markdown else ""))
    results = {}
    for n in run_sizes:
        rounds = args.rounds or rounds_for(n, args.quick)
        impls, notes = implementations(n, rng, args.quick)
        if n < MODEL_TENSORS:  # the rows keep their names; say what they measured
            notes.append(f"the {MODEL_TENSORS}-tensor and {MODEL_TENSORS}-leaf models have "
                         f"{'one tensor' if n == 1 else f'{n} tensors'} of one element at this size")
        rows = summarize(measure(impls, rounds, args.seed))
        del impls
        print()
        print(format_table(n, rows, args.markdown))
        print_notes(notes, args.markdown)
        try:
            impls = jax_adapter_implementations(n, rng)
        except ImportError:
            print_notes(["jax/optax not installed: flatopt.jax skipped"], args.markdown)
        else:
            jax_rows = summarize(measure(impls, args.rounds or jax_rounds_for(n, args.quick), args.seed))
            del impls
            print()
            print(format_table(n, jax_rows, args.markdown, f"the JAX adapter on a {MODEL_TENSORS}-leaf model, "
                                                          "timed apart (XLA's threads slow their neighbours)"))
            rows += [r for r in jax_rows if r["name"] != FLOOR]
        results[n] = rows
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot saved to {args.plot}")
    return results

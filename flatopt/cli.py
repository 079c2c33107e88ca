"""The ``flatopt`` command: ``flatopt demo`` and ``flatopt bench``."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flatopt", description="flat-buffer optimizers on Numba kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a NumPy MLP on the bundled digits with every optimizer")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--optimizers", help="comma-separated subset, e.g. Adam,ADOPT")
    demo.add_argument("--plot", metavar="FILE.png", help="save the loss curves")
    commands.add_parser("bench", help="compare against torch/optax/NumPy and the bandwidth floor", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from flatopt.bench import main as bench_main
        bench_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from flatopt import demo as demo_module
    names = args.optimizers.split(",") if args.optimizers else None
    unknown = set(names or ()) - set(demo_module.OPTIMIZERS)
    if unknown:
        parser.error(f"unknown optimizers {sorted(unknown)}; choose from {list(demo_module.OPTIMIZERS)}")
    demo_module.run(epochs=args.epochs, seed=args.seed, names=names, plot=args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

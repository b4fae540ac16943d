"""Score genomes on the real INT8 execution path: patch the IR's constants, compile, infer, compare.

This is the *plain path*: every candidate is compiled by the stock CPU plugin, so the fitness that selects
is exactly what the written IR will compute. Worker processes receive a :class:`FitnessContext` once (by
file path) and genomes as plain payloads; each builds its own OpenVINO objects, since none of them pickle.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov

from evoquant.data.preprocess import InputSpec
from evoquant.errors import EvoquantError
from evoquant.fitness.objectives import OBJECTIVES, Objective, checked, load_hook
from evoquant.ir.patch import ConstantPatcher
from evoquant.ir.runtime import BATCH_SIZES, compile_ir, infer, read_ir
from evoquant.ir.weights import find_quantized_weights
from evoquant.search.genome import Payload, apply_shifts


@dataclass(frozen=True)
class ImageDraw:
    """A seeded draw from a data source spec: lets a worker make the fitness images itself.

    ``materialize`` samples ``total`` images exactly as the main process did and keeps ``[start:stop]``
    (selection and verification are two slices of one draw, so they stay disjoint), then, with ``picked``,
    the images the importance draw chose from that slice.
    """

    spec: str
    total: int
    start: int
    stop: int
    shape: tuple[int, ...]  # the model's per-sample input shape
    seed: int
    inputs: "InputSpec"  # how images become the model's input (range, mean/scale, layout)
    picked: tuple[int, ...] | None = None

    def materialize(self) -> np.ndarray:
        from evoquant.data import load_source

        batch = self.inputs.draw(load_source(self.spec), self.total, self.shape, seed=self.seed)
        images = batch.images[self.start : self.stop]
        return np.ascontiguousarray(images if self.picked is None else images[list(self.picked)])


@dataclass
class FitnessContext:
    """Everything a worker needs to score genomes; small enough to pickle once per worker.

    ``objective`` is a built-in name, a ``module:function`` hook spec, or a picklable callable. With a
    ``draw``, the images are not pickled: each worker draws them from the source spec and seed itself.
    ``weights`` (one per image, built-in objectives only) make the fitness an importance-weighted mean.
    """

    model_xml: str
    images: np.ndarray | None
    teacher: list[np.ndarray] | None
    labels: np.ndarray | None
    objective: str | Objective
    threads: int | None = None
    draw: ImageDraw | None = None
    weights: np.ndarray | None = None
    model_data: tuple[bytes, bytes] | None = None  # the IR's .xml and .bin themselves, for workers without the file system

    def read_model(self):
        """The model to score candidates of: from ``model_data`` when the context carries it, else the file;
        taking any batch (a user's IR may fix it at one)."""
        from evoquant.ir.runtime import core, with_sample_shape

        if self.model_data is None:
            return with_sample_shape(read_ir(self.model_xml))
        xml, weights = self.model_data
        return with_sample_shape(core().read_model(xml.decode("utf-8"), ov.Tensor(np.frombuffer(weights, dtype=np.uint8).copy())))

    def carrying_model(self) -> "FitnessContext":
        """A copy that carries the IR's bytes (and its images, even with a draw), so it can be sent anywhere."""
        import dataclasses

        path = Path(self.model_xml)
        return dataclasses.replace(self, model_data=(path.read_bytes(), path.with_suffix(".bin").read_bytes()), images=self.ensure_images(), draw=None)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.draw is not None:
            state["images"] = None  # the worker regenerates them (see ensure_images)
        return state

    def ensure_images(self) -> np.ndarray:
        """The fitness images, drawn from ``draw`` on first use in a worker."""
        if self.images is None:
            if self.draw is None:
                raise ValueError("a fitness context needs images or a draw")
            self.images = self.draw.materialize()
        return self.images

    def resolve_objective(self) -> tuple[Objective, str]:
        """The callable, and how to name it in error messages."""
        if callable(self.objective):
            return self.objective, f"hook {getattr(self.objective, '__qualname__', type(self.objective).__name__)!r}"
        if self.objective in OBJECTIVES:
            return OBJECTIVES[self.objective], f"objective {self.objective!r}"
        return load_hook(self.objective), f"hook {self.objective!r}"


#: :meth:`PlainEvaluator.race_many` compiles the next candidate while the current one runs when compiling takes
#: at least this share of inferring (OpenVINO compiles on one core; where inference dominates, compiling
#: alongside only takes a core from it): MobileNetV3-small 0.9 (compile ahead: 8 candidates 2.7 → 1.8 s),
#: resnet18 0.35 (2.3 → 2.1 s), the ViT 0.2 (8.6 → 9.3 s), compose images 2,048.
COMPILE_AHEAD = 0.5

#: Timed inference calls per batch size before :class:`PlainEvaluator` keeps the fastest
#: (:data:`~evoquant.ir.runtime.BATCH_SIZES`).
BATCH_TRIALS = 3


class PlainEvaluator:
    """Fitness of sparse genomes by patch → compile → infer → objective, on one model object.

    The model is patched in place and restored after each compile (``compile_model`` copies it), so no
    per-candidate clone of the graph is needed.
    """

    def __init__(self, context: FitnessContext):
        self.context = context
        context.ensure_images()
        self.model = context.read_model()
        self.table = find_quantized_weights(self.model)
        self.patcher = ConstantPatcher(self.model, self.table)
        self.objective, self.objective_name = context.resolve_objective()
        self.compile_ahead: bool | None = None  # race_many's decision, once it has timed a candidate
        # images per inference call: the first candidates raced alternate between BATCH_SIZES, timed; then
        # the fastest per image is kept (the candidates have to be run anyway, so choosing costs nothing)
        self.batch_size: int | None = None
        self._batch_trials: dict[int, list[float]] = {size: [] for size in BATCH_SIZES}

    def compiled(self, payload: Payload) -> ov.CompiledModel:
        """The candidate, compiled (the model object itself is left as it was)."""
        states = {tensor: apply_shifts(self.table[tensor].states, indices, deltas) for tensor, (indices, deltas) in payload.items()}
        self.patcher.apply(states)
        try:
            return compile_ir(self.model, threads=self.context.threads)
        finally:
            self.patcher.restore()

    def outputs(self, payload: Payload) -> list[np.ndarray]:
        """The candidate's outputs on the context's images."""
        return infer(self.compiled(payload), self.context.images, batch_size=self.batch_size or BATCH_SIZES[0])

    def score(self, outputs: Sequence[np.ndarray], count: int | None = None) -> float:
        """Apply the objective to outputs (of the first ``count`` images only, when given), checking the
        result is a finite number."""
        context = self.context
        teacher, labels, weights = context.teacher, context.labels, context.weights
        if count is not None:
            teacher = None if teacher is None else [t[:count] for t in teacher]
            labels = None if labels is None else labels[:count]
            weights = None if weights is None else weights[:count]
        keywords = {} if weights is None else {"weights": weights}
        if self.objective_name.startswith("objective "):  # a built-in: its errors are evoquant's bugs, not the user's
            return checked(self.objective(list(outputs), teacher, labels, **keywords), self.objective_name)
        try:
            value = self.objective(list(outputs), teacher, labels, **keywords)
        except SystemExit as exit_:  # a hook must not end the run (and with it, the result) by itself
            raise EvoquantError(f"the fitness {self.objective_name} called sys.exit({exit_.code!r}); a hook must return a number") from None
        except Exception as error:
            message = " ".join(str(error).split()) or "no message"
            raise EvoquantError(f"the fitness {self.objective_name} raised {type(error).__name__}: {message}") from None
        return checked(value, self.objective_name)

    def race(self, payload: Payload, count: int, bound: float) -> tuple[float | None, float]:
        """Score on the first ``count`` images; go on to the rest only when that score is at most ``bound``.
        Returns (the fitness on every image, or None when stopped early; the score on the first ``count``)."""
        return self.race_compiled(self.compiled(payload), count, bound)

    def race_many(self, payloads: Sequence[Payload], count: int, bound: float, *, compile_ahead: bool | None = None) -> list[tuple[float | None, float]]:
        """:meth:`race` for each payload; with ``compile_ahead`` the next candidate is compiled in a thread
        while this one runs (OpenVINO compiles on one core, so this pays where compiling costs as much as
        inferring; where inference dominates it only takes a core from it). ``None`` decides once per
        evaluator, on the first candidate it scores: compile ahead when compiling took at least
        :data:`COMPILE_AHEAD` of the time inferring did (:attr:`compile_ahead` holds the decision)."""
        payloads = list(payloads)
        results = []
        if compile_ahead is None:
            if self.compile_ahead is None and payloads:
                started = time.perf_counter()
                compiled = self.compiled(payloads.pop(0))
                compiling = time.perf_counter() - started
                results.append(self.race_compiled(compiled, count, bound))
                self.compile_ahead = compiling >= COMPILE_AHEAD * (time.perf_counter() - started - compiling)
            compile_ahead = bool(self.compile_ahead)
        if not compile_ahead or len(payloads) < 2:
            return results + [self.race(payload, count, bound) for payload in payloads]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:  # one compile at a time: the patcher is not shared (two compilers
            pending = pool.submit(self.compiled, payloads[0])  # on two copies of the model were no faster)
            for position in range(len(payloads)):
                compiled = pending.result()
                if position + 1 < len(payloads):
                    pending = pool.submit(self.compiled, payloads[position + 1])
                results.append(self.race_compiled(compiled, count, bound))
        return results

    def _infer_timed(self, compiled: ov.CompiledModel, images: np.ndarray) -> list[np.ndarray]:
        """Infer in batches of :attr:`batch_size`; until that is decided, alternate between the candidate
        sizes, timing each call, and decide once every size has :data:`BATCH_TRIALS` calls of at least 128
        images: the size with the lowest time per image (the best of its calls: noise only slows a call)."""
        if self.batch_size is not None or len(images) < 128:
            return infer(compiled, images, batch_size=self.batch_size or BATCH_SIZES[0])
        size = min(self._batch_trials, key=lambda candidate: len(self._batch_trials[candidate]))
        started = time.perf_counter()
        outputs = infer(compiled, images, batch_size=size)
        self._batch_trials[size].append((time.perf_counter() - started) / len(images))
        if all(len(times) >= BATCH_TRIALS for times in self._batch_trials.values()):
            self.batch_size = min(self._batch_trials, key=lambda candidate: min(self._batch_trials[candidate]))
        return outputs

    def race_compiled(self, compiled: ov.CompiledModel, count: int, bound: float) -> tuple[float | None, float]:
        images = self.context.images
        head = self._infer_timed(compiled, images[:count])
        early = self.score(head, count)
        if early > bound or count >= len(images):
            return (None if early > bound else early), early
        tail = self._infer_timed(compiled, images[count:])
        return self.score([np.concatenate([h, t]) for h, t in zip(head, tail)]), early

    def __call__(self, payload: Payload) -> float:
        return self.score(self.outputs(payload))


# One evaluator per context file per process: workers are reused across generations (loky keeps them).
_WORKER_EVALUATORS: dict[tuple, PlainEvaluator] = {}


def save_context(context: FitnessContext, path: Path) -> str:
    """Pickle the context next to the run so workers can load it by path (sent once, not per genome)."""
    import cloudpickle  # pickles lambdas and closures too, as loky does for tasks

    try:
        path.write_bytes(cloudpickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL))
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise EvoquantError(f"the fitness hook cannot be sent to worker processes ({error}); define it at module level or use --jobs 1") from None
    return str(path)


def worker_evaluator(context_path: str, kind: str = "plain", build: Callable[[FitnessContext], PlainEvaluator] = PlainEvaluator) -> PlainEvaluator:
    """This worker's evaluator of ``kind`` for the run whose context is saved at ``context_path``, built
    once by ``build`` (the plain path, or the suffix engine) and kept while the worker serves that run."""
    key = (context_path, kind)
    evaluator = _WORKER_EVALUATORS.get(key)
    if evaluator is None:
        with open(context_path, "rb") as handle:
            evaluator = build(pickle.load(handle))
        _WORKER_EVALUATORS.clear()  # one run at a time per worker: free the previous run's model
        _WORKER_EVALUATORS[key] = evaluator
    return evaluator


def evaluate_in_worker(context_path: str, payload: Payload) -> float:
    """Top-level (picklable) entry point for worker processes."""
    return worker_evaluator(context_path)(payload)


def evaluate_chunk(function: Callable[[Payload], float], payloads: list[Payload]) -> list[float]:
    """Evaluate a chunk of genomes in one task, amortising the task overhead."""
    return [function(payload) for payload in payloads]

"""The parallel map handed to DEAP's ``toolbox.map``: joblib locally, any joblib backend on a cluster.

``jobs == 1`` maps in this process. Otherwise a generation's genomes are split into one chunk per job and
run through a persistent ``joblib.Parallel`` (workers survive between generations, so each loads its model
once). A distributed backend slots in by name: with ``backend="dask"`` and a ``dask.distributed.Client``
created by the caller, the same chunks run on the cluster's workers (which must see the IR path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from evoquant.config import SearchConfig
from evoquant.errors import EvoquantError
from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator, evaluate_chunk
from evoquant.search.genome import SearchSpace
from evoquant.search.strategy import SearchState
from evoquant.ir.runtime import cpu_count


def threads_per_job(jobs: int) -> int:
    """Inference threads per worker so that jobs × threads never exceeds the cores."""
    return max(1, cpu_count() // max(1, jobs))


class ParallelMap:
    """A ``map(function, items)`` that evaluates items on ``jobs`` joblib workers; use as a context manager."""

    def __init__(self, jobs: int, backend: str = "loky"):
        self.jobs = jobs
        self.backend = backend
        self._parallel = None
        self._config = None

    def __enter__(self) -> "ParallelMap":
        if self.jobs > 1:
            from joblib import Parallel, parallel_config

            try:
                # parallel_config (unlike Parallel(backend=...)) also registers joblib's external backends (dask).
                self._config = parallel_config(backend=self.backend, n_jobs=self.jobs)
                self._config.__enter__()
                self._parallel = Parallel()
                self._parallel.__enter__()
            except (ValueError, KeyError, ImportError) as error:
                self.__exit__(None, None, None)
                raise EvoquantError(f"joblib backend {self.backend!r} is not available: {str(error).splitlines()[0]}") from None
        return self

    def __exit__(self, *exc_info) -> None:
        if self._parallel is not None:
            self._parallel.__exit__(*exc_info)
            self._parallel = None
        if self._config is not None:
            self._config.__exit__(*exc_info)
            self._config = None

    def __call__(self, function: Callable, items: Iterable) -> list:
        items = list(items)
        if self._parallel is None or len(items) <= 1:
            return [function(item) for item in items]
        from joblib import delayed

        chunks = [items[i :: self.jobs] for i in range(self.jobs)]
        results = self._parallel(delayed(partial(evaluate_chunk, function))(chunk) for chunk in chunks if chunk)
        # Undo the round-robin split so results line up with items.
        ordered = [None] * len(items)
        for start, chunk_results in enumerate(results):
            ordered[start :: self.jobs] = chunk_results
        return ordered


@contextmanager
def cluster_backend(backend: str, scheduler: str | None = None):
    """Connect the ``dask`` joblib backend to a scheduler for the duration of a run (no-op otherwise).

    With ``scheduler=None`` a local dask cluster is started, which is how the distributed path is tested
    on one machine; on a cluster, pass the scheduler's address. Workers must see the model's path.
    """
    if backend != "dask":
        yield None
        return
    try:
        from dask.distributed import Client
    except ImportError:
        raise EvoquantError("--backend dask needs dask.distributed: pip install 'evoquant[dask]'") from None
    try:
        client = Client(scheduler) if scheduler else Client(processes=True, n_workers=cpu_count(), threads_per_worker=1, dashboard_address=None)
    except (OSError, ValueError) as error:
        raise EvoquantError(f"cannot reach the dask scheduler {scheduler}: {error}") from None
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------
# islands: one island's epoch as a task for any worker
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IslandTask:
    """One island's epoch. ``context`` carries the model's bytes and the fitness images (workers need no
    shared file system); None when the epoch runs in the process that registered the run's evaluator."""

    token: str  # the run: a worker keeps one evaluator per run
    context: FitnessContext | None
    config: SearchConfig
    island: int
    state: SearchState | None
    generations: int
    engine_layers: object | None = None  # the suffix engine's layer decisions (None: the plain path)
    max_cache_mb: float = 512.0


# token -> (evaluator, search space, map function); one run at a time per process
_ISLAND_WORKERS: dict[str, tuple] = {}


def register_island_evaluator(token: str, evaluator, space: SearchSpace, map_function: Callable = map) -> None:
    """Let epochs of run ``token`` in this process use an evaluator built already (the main process's)."""
    _ISLAND_WORKERS.clear()
    _ISLAND_WORKERS[token] = (evaluator, space, map_function)


def island_epoch(task: IslandTask) -> SearchState:
    """Top-level (picklable) entry point: run ``task.generations`` generations of one island, from its state
    (or from the start), and return its new state."""
    from evoquant.search.islands import island_config
    from evoquant.search.strategy import Search

    worker = _ISLAND_WORKERS.get(task.token)
    if worker is None:
        if task.context is None:
            raise RuntimeError("an island epoch reached a process without its run's evaluator")
        if task.engine_layers is not None:
            from evoquant.fitness.engine import SuffixEngine

            evaluator = SuffixEngine(task.context, max_cache_mb=task.max_cache_mb, layers=task.engine_layers)
            map_function = lambda function, payloads: evaluator.evaluate_many(list(payloads))  # noqa: E731
        else:
            evaluator, map_function = PlainEvaluator(task.context), map
        worker = (evaluator, SearchSpace.from_weights(evaluator.table, max_shift=task.config.max_shift), map_function)
        register_island_evaluator(task.token, *worker)
    evaluator, space, map_function = worker
    search = Search(space, evaluator, island_config(task.config, task.island), map_function=map_function, state=task.state)
    search.run(generations=task.generations)
    return search.state()

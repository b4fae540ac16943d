"""The parallel map handed to DEAP's ``toolbox.map``: joblib locally, any joblib backend on a cluster.

``jobs == 1`` maps in this process. Otherwise a generation's genomes are split into one chunk per job and
run through a persistent ``joblib.Parallel`` (workers survive between generations, so each loads its model
once). A distributed backend slots in by name: with ``backend="dask"`` and a ``dask.distributed.Client``
created by the caller, the same chunks run on the cluster's workers (which must see the IR path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import partial

from evoquant.errors import EvoquantError
from evoquant.fitness.evaluator import evaluate_chunk
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

"""Islands on a dask cluster: one island per worker, the model and images sent with the tasks (workers need
no shared file system), the same result as on one machine for the same seed.

    python docs/examples/dask_jobqueue_islands.py int8.xml fp32.xml --islands 4 --slurm   # dask-jobqueue
    python docs/examples/dask_jobqueue_islands.py int8.xml fp32.xml --islands 2           # a local cluster

On SLURM this needs ``pip install dask-jobqueue``; PBS, SGE, LSF and Kubernetes (dask-kubernetes) clusters
work the same way: anything that gives a ``dask.distributed.Client``.
"""

from __future__ import annotations

import argparse

import evoquant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("reference")
    parser.add_argument("--islands", type=int, default=4)
    parser.add_argument("--generations", type=int, default=60)
    parser.add_argument("--output", "-o")
    parser.add_argument("--slurm", action="store_true", help="workers are SLURM jobs (dask-jobqueue) instead of local processes")
    args = parser.parse_args()

    from dask.distributed import Client, LocalCluster

    if args.slurm:
        from dask_jobqueue import SLURMCluster

        cluster = SLURMCluster(cores=2, processes=1, memory="8GB", walltime="02:00:00")
        cluster.scale(jobs=args.islands)
    else:
        cluster = LocalCluster(n_workers=min(args.islands, 2), threads_per_worker=1, dashboard_address=None)
    config = evoquant.RefineConfig.from_yaml("default").replace(
        stages="reconstruct,compose,evolve",  # islands are populations of the evolve stage
        jobs=args.islands, backend="dask", search={"islands": args.islands, "generations": args.generations})
    with cluster, Client(cluster):  # joblib's dask backend uses this client
        result = evoquant.refine(args.model, reference=args.reference, output=args.output, config=config)
    print(result.table())


if __name__ == "__main__":
    main()

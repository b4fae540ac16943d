"""The classic layer-wise rounding methods, as anchors for evoquant's reconstruct stage.

Each module defines a solver (``LayerProblem -> integer states``, see
:mod:`evoquant.reconstruct.solver`) and :func:`register` makes them available to refine as
``ReconstructConfig(solver="gptq")`` / ``solver="adaround"``. Run through refine's reconstruct stage, they
get exactly what evoquant's own solver gets: the same calibration images, each layer's inputs from the
quantized model as the CPU plugin computes them (earlier layers already solved), and the same write-back
and verification. They differ only in what they fit:

- ``gptq``: classic GPTQ (Frantar et al. 2022): the weights-only target ``‖W_fp X − Q X‖²``, the FP32
  weight rounded column by column with error feedback on the damped input Hessian, over the quantizer's
  whole range.
- ``adaround``: AdaRound (Nagel et al. 2020) with the output target (the asymmetric form: the quantized
  model's inputs, the FP32 layer's output including its bias): a soft rounding variable per weight between
  floor and ceil of the FP32 weight, Adam on the reconstruction loss plus the annealed rounding regulariser.
- ``exhaustive``: evoquant's own objective solved exactly (every assignment within the grid) on layers of
  at most 10 columns, evoquant's solver on the rest: whether GPTQ's greedy column order costs anything.

Nothing here is shipped with evoquant: ``benchmarks/stages.py --baselines gptq,adaround`` runs them;
``benchmarks/reconstruct_draws.py --settings '[{"solver": "exhaustive"}]'`` takes any of them as a setting.
"""

from __future__ import annotations

from evoquant.reconstruct.solver import register_solver

from .adaround import adaround_solver
from .exhaustive import exhaustive_solver
from .gptq import gptq_solver

BASELINES = {"gptq": gptq_solver, "adaround": adaround_solver, "exhaustive": exhaustive_solver}


def register() -> None:
    for name, solver in BASELINES.items():
        register_solver(name, solver)

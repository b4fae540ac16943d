"""The suffix engine: score a candidate from its parent's cached activations, recomputing only the part of
the graph that the changed layer can reach, in graphs compiled once per (parent, layer), not per candidate.

A candidate of the evolution strategy is usually its parent plus shifts in one tensor. For such a
candidate the engine

1. takes the parent's activations at the layer's frontier (one probe run per parent, cached),
2. runs the layer's suffix graph (:mod:`evoquant.ir.cut`), compiled with the parent's weights below the
   layer and the changed layer's weight as an f32 input, so every candidate of the same (parent, layer)
   reuses one compiled graph,
3. takes the outputs the suffix doesn't reach from the parent.

Anything else (the start model, crossover children, genomes whose parent is unknown) goes through the
plain path, so the engine is always correct and only faster where it can be. Caches are bounded: the
activations by ``max_cache_mb``, the compiled graphs by count; evicted entries are rebuilt on demand.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator
from evoquant.ir.cut import build_probe, build_suffix, plan_cut
from evoquant.ir.runtime import compile_ir, infer
from evoquant.search.genome import Payload, apply_shifts, payload_from_key, payload_key


def _float_rounding_only(produced: np.ndarray, reference: np.ndarray) -> bool:
    """Equal up to float rounding; a flipped activation level shows as a jump far larger than this."""
    return bool(np.max(np.abs(produced - reference), initial=0.0) <= 1e-5 * max(1.0, float(np.max(np.abs(reference), initial=0.0))))


def _same_shifts(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@dataclass
class EngineStats:
    """Counters for the benchmark and the report."""

    suffix_evaluations: int = 0
    plain_evaluations: int = 0
    suffix_compiles: int = 0
    probe_compiles: int = 0
    peak_cache_bytes: int = 0


class SuffixEngine(PlainEvaluator):
    """Fitness by suffix recomputation; a drop-in for :class:`PlainEvaluator` with a batch entry point."""

    def __init__(self, context: FitnessContext, *, max_cache_mb: float = 512.0, max_compiled: int = 24, known_genomes: int = 64):
        super().__init__(context)
        self._reference_outputs = None
        self._safety: dict[str, bool] = {}
        self.cuts = [plan_cut(self.model, weight, self._export_is_exact) for weight in self.table]
        self.frontier = sorted({key for cut in self.cuts for key in cut.frontier})
        self.max_cache_bytes = int(max_cache_mb * 2**20)
        self.max_compiled = max_compiled
        self.known_limit = known_genomes
        self.known: OrderedDict[tuple, Payload] = OrderedDict()
        self.activations: OrderedDict[tuple, tuple[dict[str, np.ndarray], list[np.ndarray]]] = OrderedDict()
        self.suffixes: OrderedDict[tuple, object] = OrderedDict()
        self.stats = EngineStats()
        self.exact_layers = self._exact_layers()

    def _export_is_exact(self, key: str) -> bool:
        """Whether reading activation ``key`` out of the model leaves its outputs bit-identical."""
        if key not in self._safety:
            images = self.context.images[:32]
            if self._reference_outputs is None:
                self._reference_outputs = infer(compile_ir(self.model, threads=self.context.threads), images)
            probed = infer(compile_ir(build_probe(self.model, [key]), threads=self.context.threads, f32=True), images)
            self._safety[key] = all(np.array_equal(a, b) for a, b in zip(probed, self._reference_outputs))
        return self._safety[key]

    def _exact_layers(self) -> frozenset[int]:
        """Layers whose suffix reproduces the plain INT8 path bit for bit (checked on the start model).

        The cut layer runs in f32 in its suffix; where the CPU plugin would have fused it into an INT8
        pattern (e.g. a conv feeding a residual Add), rounding then differs slightly. Candidates changing
        such a layer go through the plain path, so the engine's fitness is exact for every candidate.
        """
        if self._reference_outputs is None:
            self._reference_outputs = infer(compile_ir(self.model, threads=self.context.threads), self.context.images[:32])
        start = payload_key({})
        exact = set()
        activations = infer(compile_ir(build_probe(self.model, self.frontier), threads=self.context.threads, f32=True), self.context.images[:32])
        frontier_values = dict(zip(self.frontier, activations[len(self.model.outputs):]))
        for tensor, cut in enumerate(self.cuts):
            compiled = compile_ir(build_suffix(self.model, self.table[tensor], cut), threads=self.context.threads, f32=True)
            inputs = {i: frontier_values[k] for i, k in enumerate(cut.frontier)}
            weight = self.table[tensor]
            inputs[len(cut.frontier)] = np.ascontiguousarray(weight.values(weight.states).astype(np.float32).reshape(cut.weight_shape))
            produced = compiled.create_infer_request().infer(inputs)
            if all(_float_rounding_only(np.asarray(produced[compiled.outputs[p]]), self._reference_outputs[o]) for p, o in enumerate(cut.outputs)):
                exact.add(tensor)
                self.suffixes[(start, tensor)] = compiled  # batch is dynamic: reusable for the full batch
        return frozenset(exact)

    # -- the batch entry point -------------------------------------------------------------------------
    def evaluate_many(self, payloads: Sequence[Payload]) -> list[float]:
        """Fitness of each payload; candidates sharing a (parent, layer) share one compiled suffix."""
        plans = [self._find_parent(payload) for payload in payloads]
        scores: list[float | None] = [None] * len(payloads)
        groups: dict[tuple, list[int]] = {}
        for i, plan in enumerate(plans):
            if plan is None:
                scores[i] = self(payloads[i])
                self.stats.plain_evaluations += 1
            else:
                groups.setdefault(plan, []).append(i)
        for (parent, tensor), members in groups.items():
            for i, outputs in zip(members, self._suffix_outputs(parent, tensor, [payloads[i] for i in members])):
                scores[i] = self.score(outputs)
                self.stats.suffix_evaluations += 1
        for payload in payloads:
            self._remember(payload)
        return [float(s) for s in scores]

    # -- parents --------------------------------------------------------------------------------------
    def _remember(self, payload: Payload) -> None:
        key = payload_key(payload)
        self.known[key] = payload
        self.known.move_to_end(key)
        while len(self.known) > self.known_limit:
            self.known.popitem(last=False)

    def _find_parent(self, payload: Payload) -> tuple[tuple, int] | None:
        """A known genome that differs from ``payload`` in exactly one tensor, preferring cached ones."""
        best = None
        for key, parent in reversed(self.known.items()):
            differing = [t for t in set(parent) | set(payload) if not _same_shifts(parent.get(t), payload.get(t))]
            if len(differing) != 1 or differing[0] not in self.exact_layers:
                continue
            plan = (key, differing[0])
            if plan in self.suffixes:
                return plan
            if best is None or (key in self.activations and best[0] not in self.activations):
                best = plan
        return best

    def _parent_states(self, key: tuple) -> dict[int, np.ndarray]:
        parent = self.known.get(key)
        if parent is None:  # evicted from the known list: rebuild from the key
            parent = payload_from_key(key)
        return {t: apply_shifts(self.table[t].states, idx, delta) for t, (idx, delta) in parent.items()}

    def _parent_activations(self, key: tuple) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        cached = self.activations.get(key)
        if cached is not None:
            self.activations.move_to_end(key)
            return cached
        self.patcher.apply(self._parent_states(key))
        try:
            probe = compile_ir(build_probe(self.model, self.frontier), threads=self.context.threads, f32=True)
        finally:
            self.patcher.restore()
        self.stats.probe_compiles += 1
        values = infer(probe, self.context.images)
        n_outputs = len(self.model.outputs)
        entry = (dict(zip(self.frontier, values[n_outputs:])), values[:n_outputs])
        self.activations[key] = entry
        self._evict()
        return entry

    def _evict(self) -> None:
        size = sum(sum(a.nbytes for a in acts.values()) + sum(o.nbytes for o in outs) for acts, outs in self.activations.values())
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, size)
        while size > self.max_cache_bytes and len(self.activations) > 1:
            _, (acts, outs) = self.activations.popitem(last=False)
            size -= sum(a.nbytes for a in acts.values()) + sum(o.nbytes for o in outs)

    # -- suffixes -------------------------------------------------------------------------------------
    def _compiled_suffix(self, key: tuple, tensor: int):
        compiled = self.suffixes.get((key, tensor))
        if compiled is not None:
            self.suffixes.move_to_end((key, tensor))
            return compiled
        states = self._parent_states(key)
        states.pop(tensor, None)  # the cut layer's weight becomes an input anyway
        self.patcher.apply(states)
        try:
            suffix = build_suffix(self.model, self.table[tensor], self.cuts[tensor])
        finally:
            self.patcher.restore()
        # f32: the cut layer runs on exact quantized values; layers below keep their INT8 kernels.
        compiled = compile_ir(suffix, threads=self.context.threads, f32=True)
        self.stats.suffix_compiles += 1
        self.suffixes[(key, tensor)] = compiled
        while len(self.suffixes) > self.max_compiled:
            self.suffixes.popitem(last=False)
        return compiled

    def _suffix_outputs(self, key: tuple, tensor: int, payloads: Sequence[Payload]) -> list[list[np.ndarray]]:
        activations, parent_outputs = self._parent_activations(key)
        compiled = self._compiled_suffix(key, tensor)
        cut, weight = self.cuts[tensor], self.table[tensor]
        request = compiled.create_infer_request()
        inputs = {i: activations[k] for i, k in enumerate(cut.frontier)}
        results = []
        for payload in payloads:
            indices, deltas = payload.get(tensor, (np.empty(0, np.int64), np.empty(0, np.int8)))
            states = apply_shifts(weight.states, indices, deltas)
            inputs[len(cut.frontier)] = np.ascontiguousarray(weight.values(states).astype(np.float32).reshape(cut.weight_shape))
            produced = request.infer(inputs)
            outputs = list(parent_outputs)
            for position, output_index in enumerate(cut.outputs):
                outputs[output_index] = np.array(produced[compiled.outputs[position]], dtype=np.float32)
            results.append(outputs)
        return results

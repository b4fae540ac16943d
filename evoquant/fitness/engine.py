"""The suffix engine: score a candidate from its parent's cached activations, recomputing only the part of
the graph that the changed layer can reach, in graphs compiled once per layer or per (parent, layer), never
per candidate.

A candidate of the evolution strategy is usually its parent plus shifts in one tensor. For such a
candidate the engine

1. takes the parent's activations at the layer's frontier (one probe run per parent, cached; for shared
   suffixes from a shared probe whose weights are inputs, so no compile per parent either),
2. runs the layer's suffix graph (:mod:`evoquant.ir.cut`) with the changed layer's weight as an f32 input,
   in one of two forms chosen per layer at set-up:

   * *shared*: every quantized weight below the layer is an f32 input too, so one compile per layer serves
     every parent for the whole run. f32 kernels below the cut do not reproduce INT8 bit for bit, so a
     layer gets this form only if, on a few random mutations, the suffix's fitness error is at most a tenth
     of the fitness change the mutations cause (it ranks candidates as the plain path does);
   * *per parent*: the parent's weights below the layer stay INT8 Constants, compiled once per (parent,
     layer), if that reproduces the plain path up to float rounding; used for groups of at least
     ``MIN_PER_PARENT_GROUP`` candidates of one (parent, layer), since a compile and a probe for fewer
     cost more than compiling each candidate whole;

3. takes the outputs the suffix doesn't reach from the parent.

Anything else (the start model, crossover children, genomes whose parent is unknown) goes through the
plain path, so the engine ranks candidates as the plain path does and is only faster where it can be
(the final IR is always re-scored on the plain path by ``refine``). Caches are bounded: the
activations by ``max_cache_mb``, the compiled graphs by count; evicted entries are rebuilt on demand.

With several jobs, the engine in the main process plans a generation (which candidates share a
(parent, layer) suffix) and joblib workers run the groups: each worker keeps its own engine, built from the
main engine's layer decisions (:class:`EngineLayers`, so the set-up checks run once) and its own caches,
each within ``max_cache_mb``. Routing depends only on the candidates, never on caches or timings, so
the scores do not depend on the number of jobs.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial

import numpy as np

from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator, worker_evaluator
from evoquant.ir.cut import Cut, build_probe, build_suffix, plan_cut
from evoquant.ir.runtime import compile_ir, infer
from evoquant.search.genome import Genome, Payload, SearchSpace, apply_shifts, payload_from_key, payload_key
from evoquant.search.operators import mutate_random

SHARED_CHECK_MUTATIONS = 3  # random mutations per layer that decide whether its shared suffix ranks exactly
SHARED_CHECK_TOLERANCE = 0.1  # allowed fitness error, as a share of the mutations' median fitness change
# Fewest candidates of one (parent, layer) worth a per-parent suffix: its compile and the parent's probe
# cost about four plain evaluations (residual_cnn, 512 images: probe 189 ms, suffix compile 19-64 ms, run
# 1-27 ms, against 62 ms for compiling and running the whole candidate). A fixed count, not measured
# timings, so that the same seed takes the same path on any machine and with any number of jobs.
MIN_PER_PARENT_GROUP = 4
SETUP_CHECK_IMAGES = 32  # images the set-up's exactness checks run on
SETUP_STEPS_PER_LAYER = 3  # progress steps of the set-up: cut, shared check, exactness check


def _float_rounding_only(produced: np.ndarray, reference: np.ndarray) -> bool:
    """Equal up to float rounding; a flipped activation level shows as a jump far larger than this."""
    return bool(np.max(np.abs(produced - reference), initial=0.0) <= 1e-5 * max(1.0, float(np.max(np.abs(reference), initial=0.0))))


def _same_shifts(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@dataclass(frozen=True)
class EngineLayers:
    """The set-up's decisions: each layer's cut, which layers the engine serves from suffixes (``exact``)
    and which of those from shared ones."""

    cuts: tuple[Cut, ...]
    exact: frozenset[int]
    shared: frozenset[int]


@dataclass(frozen=True)
class SuffixGroup:
    """Work for one suffix: candidates that differ from the parent (``parent``, a payload key) in ``tensor`` only."""

    parent: tuple
    tensor: int
    payloads: tuple


@dataclass
class EngineStats:
    """Counters for the benchmark and the report."""

    suffix_evaluations: int = 0
    plain_evaluations: int = 0
    suffix_compiles: int = 0
    probe_compiles: int = 0
    shared_layers: int = 0
    peak_cache_bytes: int = 0
    setup_seconds: float = 0.0


class SuffixEngine(PlainEvaluator):
    """Fitness by suffix recomputation; a drop-in for :class:`PlainEvaluator` with a batch entry point."""

    def __init__(
        self,
        context: FitnessContext,
        *,
        max_cache_mb: float = 512.0,
        max_compiled: int = 24,
        known_genomes: int = 64,
        layers: EngineLayers | None = None,
        progress: Callable[[], None] | None = None,
    ):
        """``layers`` skips the set-up checks (a worker takes the main engine's decisions); ``progress`` is
        called after each of the set-up's ``SETUP_STEPS_PER_LAYER * len(table)`` steps (per layer: its
        cut, its shared check, its exactness check)."""
        started = time.perf_counter()
        super().__init__(context)
        self._safety: dict[str, bool] = {}
        self._progress = progress or (lambda: None)
        self.cuts = list(layers.cuts) if layers is not None else [self._planned(weight) for weight in self.table]
        self.frontier = sorted({key for cut in self.cuts for key in cut.frontier})
        self.max_cache_bytes = int(max_cache_mb * 2**20)
        self.max_compiled = max_compiled
        self.known_limit = known_genomes
        self.known: OrderedDict[tuple, Payload] = OrderedDict()
        self.activations: OrderedDict[tuple, tuple[dict[str, np.ndarray], list[np.ndarray]]] = OrderedDict()
        self.suffixes: OrderedDict[tuple, object] = OrderedDict()
        self.stats = EngineStats()
        self.below = [tuple(w for w in self.table if w.consumer in cut.nodes and w.index != cut.tensor) for cut in self.cuts]
        self.shared_layers: set[int] = set() if layers is None else set(layers.shared)
        self._shared_suffixes: dict[int, object] = {}  # tensor -> compiled shared suffix
        self._shared_probe = None  # every weight an input: activations of any parent without a compile
        self.exact_layers = self._exact_layers() if layers is None else frozenset(layers.exact)
        self.stats.shared_layers = len(self.shared_layers)
        self.stats.setup_seconds = time.perf_counter() - started

    @property
    def layers(self) -> EngineLayers:
        return EngineLayers(tuple(self.cuts), self.exact_layers, frozenset(self.shared_layers))

    def _planned(self, weight) -> Cut:
        cut = plan_cut(self.model, weight, self._export_is_exact)
        self._progress()
        return cut

    def summary(self) -> dict:
        """For the report: which layers the engine serves and how the candidates were scored (counters of
        this process; with workers, every candidate is counted here when planned)."""
        return {
            "quantized_layers": len(self.table),
            "suffix_layers": len(self.exact_layers),
            "shared_layers": len(self.shared_layers),
            "suffix_evaluations": self.stats.suffix_evaluations,
            "plain_evaluations": self.stats.plain_evaluations,
            "setup_seconds": round(self.stats.setup_seconds, 2),
        }

    def _export_is_exact(self, key: str) -> bool:
        """Whether reading activation ``key`` out of the model leaves its outputs bit-identical."""
        if key not in self._safety:
            probed = infer(compile_ir(build_probe(self.model, [key]), threads=self.context.threads, f32=True), self._check_images)
            self._safety[key] = all(np.array_equal(a, b) for a, b in zip(probed, self._reference_outputs))
        return self._safety[key]

    @property
    def _check_images(self) -> np.ndarray:
        """The images the set-up checks run on."""
        return self.context.images[:SETUP_CHECK_IMAGES]

    @cached_property
    def _reference_outputs(self) -> list[np.ndarray]:
        """The start model's plain INT8 outputs on the check images, what the set-up checks compare with."""
        return infer(compile_ir(self.model, threads=self.context.threads), self._check_images)

    def _exact_layers(self) -> frozenset[int]:
        """Layers whose suffix reproduces the plain INT8 path bit for bit (checked on the start model).

        The cut layer runs in f32 in its suffix; where the CPU plugin would have fused it into an INT8
        pattern (e.g. a conv feeding a residual Add), rounding then differs slightly. Candidates changing
        such a layer go through the plain path, so the engine's fitness is exact for every candidate.
        """
        start = payload_key({})
        exact = set(self._shared_layers())
        activations = infer(compile_ir(build_probe(self.model, self.frontier), threads=self.context.threads, f32=True), self._check_images)
        frontier_values = dict(zip(self.frontier, activations[len(self.model.outputs):]))
        for tensor, cut in enumerate(self.cuts):
            self._progress()
            if tensor in exact:
                continue
            compiled = compile_ir(build_suffix(self.model, self.table[tensor], cut), threads=self.context.threads, f32=True)
            inputs = {i: frontier_values[k] for i, k in enumerate(cut.frontier)}
            weight = self.table[tensor]
            inputs[len(cut.frontier)] = np.ascontiguousarray(weight.values(weight.states).astype(np.float32).reshape(cut.weight_shape))
            produced = compiled.create_infer_request().infer(inputs)
            if all(_float_rounding_only(np.asarray(produced[compiled.outputs[p]]), self._reference_outputs[o]) for p, o in enumerate(cut.outputs)):
                exact.add(tensor)
                self.suffixes[(start, tensor)] = compiled  # batch is dynamic: reusable for the full batch
        return frozenset(exact)

    def _shared_layers(self) -> list[int]:
        """Layers whose shared suffix ranks candidates like the plain path (see the module docstring)."""
        space = SearchSpace.from_weights(self.table)
        rng = np.random.default_rng(0)
        start = payload_key({})
        plain_start = self.score(self.outputs({}))
        chosen = []
        for tensor, cut in enumerate(self.cuts):
            self._progress()
            if space.tensors[tensor].high <= space.tensors[tensor].low:
                continue
            self.shared_layers.add(tensor)
            error_start = abs(self.score(self._suffix_outputs(start, tensor, [{}])[0]) - plain_start)
            changes, errors = [], [error_start]
            for _ in range(SHARED_CHECK_MUTATIONS):  # one mutation at a time: most layers that fail, fail at once
                mutant = mutate_random(Genome(), space, rng, fraction=0.03, tensors=1, only=tensor).payload()
                plain = self(mutant)
                changes.append(abs(plain - plain_start))
                errors.append(abs(self.score(self._suffix_outputs(start, tensor, [mutant])[0]) - plain))
                if max(errors) > SHARED_CHECK_TOLERANCE * float(np.median(changes)):
                    break
            else:  # every mutation passed: accept unless none of them changed the fitness at all
                if float(np.median(changes)) > 0:
                    chosen.append(tensor)
                    continue
            self.shared_layers.discard(tensor)
            self._shared_suffixes.pop(tensor, None)
        return chosen

    # -- the batch entry point -------------------------------------------------------------------------
    def evaluate_many(self, payloads: Sequence[Payload], map_items: Callable[[list], list] | None = None) -> list[float]:
        """Fitness of each payload; candidates sharing a (parent, layer) share one compiled suffix.

        The work items (suffix groups and single plain candidates) run here, or through ``map_items(items)``
        (one list of scores per item), e.g. on workers running :func:`run_in_worker`.
        """
        groups: dict[tuple | None, list[int]] = {}
        for i, plan in enumerate(self._plans(payloads)):
            groups.setdefault(plan, []).append(i)
        items, members = [], []
        for plan, group in groups.items():
            # A per-parent suffix (and its parent's probe) for fewer candidates costs more than compiling each whole.
            if plan is not None and (plan[1] in self.shared_layers or len(group) >= MIN_PER_PARENT_GROUP):
                items.append(SuffixGroup(plan[0], plan[1], tuple(payloads[i] for i in group)))
                members.append(group)
            else:
                items += [payloads[i] for i in group]
                members += [[i] for i in group]
        results = [self.run(item) for item in items] if map_items is None else map_items(items)
        scores: list[float | None] = [None] * len(payloads)
        for group, item, result in zip(members, items, results):
            counter = "suffix_evaluations" if isinstance(item, SuffixGroup) else "plain_evaluations"
            setattr(self.stats, counter, getattr(self.stats, counter) + len(group))
            for i, score in zip(group, result):
                scores[i] = score
        for payload in payloads:
            self._remember(payload)
        return [float(s) for s in scores]

    def run(self, item: SuffixGroup | Payload) -> list[float]:
        """Scores of one work item: a suffix group's candidates, or one candidate on the plain path."""
        if isinstance(item, SuffixGroup):
            return [self.score(outputs) for outputs in self._suffix_outputs(item.parent, item.tensor, list(item.payloads))]
        return [self(item)]

    # -- parents --------------------------------------------------------------------------------------
    def _remember(self, payload: Payload) -> None:
        key = payload_key(payload)
        self.known[key] = payload
        self.known.move_to_end(key)
        while len(self.known) > self.known_limit:
            self.known.popitem(last=False)

    def _plans(self, payloads: Sequence[Payload]) -> list[tuple[tuple, int] | None]:
        """Each payload's (parent key, changed tensor): a known genome that differs from it in exactly one
        tensor the engine serves. Where several qualify (a rejected sibling of an earlier generation also
        does), the pair most payloads of this batch share wins, then the most recent: groups stay whole,
        and the choice depends on the genomes alone, never on what a process has cached."""
        options = []
        for payload in payloads:
            found = []
            for key, parent in reversed(self.known.items()):
                differing = [t for t in set(parent) | set(payload) if not _same_shifts(parent.get(t), payload.get(t))]
                if len(differing) == 1 and differing[0] in self.exact_layers:
                    found.append((key, differing[0]))
            options.append(found)
        counts = Counter(plan for found in options for plan in found)
        return [max(found, key=counts.__getitem__) if found else None for found in options]

    def _parent_states(self, key: tuple) -> dict[int, np.ndarray]:
        parent = self.known.get(key)
        if parent is None:  # evicted from the known list: rebuild from the key
            parent = payload_from_key(key)
        return {t: apply_shifts(self.table[t].states, idx, delta) for t, (idx, delta) in parent.items()}

    def _parent_activations(self, key: tuple, shared: bool = False) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """The parent's frontier activations and outputs: from its own INT8 probe (compiled per parent), or,
        for shared suffixes, from the shared probe (every weight an input, compiled once)."""
        cached = self.activations.get((key, shared))
        if cached is not None:
            self.activations.move_to_end((key, shared))
            return cached
        if shared:
            if self._shared_probe is None:
                self._shared_probe = compile_ir(build_probe(self.model, self.frontier, self.table), threads=self.context.threads, f32=True)
                self.stats.probe_compiles += 1
            feeds = {0: self.context.images, **self._weight_inputs(key, self.table, 1, self._shared_probe)}
            produced = self._shared_probe.create_infer_request().infer(feeds)
            values = [np.array(produced[output]) for output in self._shared_probe.outputs]
        else:
            self.patcher.apply(self._parent_states(key))
            try:
                probe = compile_ir(build_probe(self.model, self.frontier), threads=self.context.threads, f32=True)
            finally:
                self.patcher.restore()
            self.stats.probe_compiles += 1
            values = infer(probe, self.context.images)
        n_outputs = len(self.model.outputs)
        entry = (dict(zip(self.frontier, values[n_outputs:])), values[:n_outputs])
        self.activations[(key, shared)] = entry
        self._evict()
        return entry

    def _weight_inputs(self, key: tuple, weights, first: int, compiled) -> dict[int, np.ndarray]:
        """The parent's dequantized values of ``weights``, keyed by input position from ``first``."""
        states = self._parent_states(key)
        inputs = {}
        for position, weight in enumerate(weights, start=first):
            values = weight.values(states.get(weight.index, weight.states)).astype(np.float32)
            inputs[position] = np.ascontiguousarray(values.reshape(compiled.inputs[position].get_partial_shape().to_shape()))
        return inputs

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

    def _shared_suffix(self, tensor: int):
        compiled = self._shared_suffixes.get(tensor)
        if compiled is None:  # once per layer for the whole run
            compiled = compile_ir(build_suffix(self.model, self.table[tensor], self.cuts[tensor], self.below[tensor]), threads=self.context.threads, f32=True)
            self._shared_suffixes[tensor] = compiled
        return compiled

    def _suffix_outputs(self, key: tuple, tensor: int, payloads: Sequence[Payload]) -> list[list[np.ndarray]]:
        compiled = self._shared_suffix(tensor) if tensor in self.shared_layers else None
        activations, parent_outputs = self._parent_activations(key, shared=compiled is not None)
        cut, weight = self.cuts[tensor], self.table[tensor]
        inputs = {i: activations[k] for i, k in enumerate(cut.frontier)}
        if compiled is not None:  # the parent's weights below the cut are inputs of the shared suffix
            inputs.update(self._weight_inputs(key, self.below[tensor], len(cut.frontier) + 1, compiled))
        else:
            compiled = self._compiled_suffix(key, tensor)
        request = compiled.create_infer_request()
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


def run_in_worker(context_path: str, layers: EngineLayers, max_cache_mb: float, item: SuffixGroup | Payload) -> list[float]:
    """Top-level (picklable) entry point: run one work item in this worker's own engine, built once per run
    from the main engine's decisions (``layers`` and ``max_cache_mb`` are the same for every item of a run)."""
    return worker_evaluator(context_path, "suffix", partial(SuffixEngine, max_cache_mb=max_cache_mb, layers=layers)).run(item)

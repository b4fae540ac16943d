"""How far does one mutation's change spread through an INT8 network? One JSON line per (layer, fraction).

    python benchmarks/change_spread.py                      # deep_residual_cnn, as in eval_speed.py
    python benchmarks/change_spread.py --model bn_cnn --fractions 0.03,0.001

A candidate moves a fraction of one layer's weights by ±1 state. For every quantized activation below that
layer (the outputs of activation FakeQuantize nodes), this prints the share of elements whose quantized value
differs from the parent's, and the share of images whose logits moved at all. It bounds what a sparse
"propagate only the changed elements" evaluator could save (issue: the fitness engine): if the changed share
stays small, sparse propagation wins; if it grows to tens of percent, the recompute below the cut is dense.
Exporting every activation can change how the CPU plugin fuses a few nodes, so the shares are approximate.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def macs(node) -> int:
    """Multiply-accumulates of one Convolution / GroupConvolution / MatMul per image (static shapes)."""
    out = [int(d) for d in node.get_output_partial_shape(0).get_min_shape()][1:]
    weight = [int(d) for d in node.input_value(1).get_shape()]
    if node.get_type_name() == "MatMul":
        return int(np.prod(out)) * (weight[-1] if node.get_attributes().get("transpose_b") else weight[0])
    return int(np.prod(out)) * int(np.prod(weight[-3:]))  # (in/groups) x kh x kw per output, both conv kinds


def suffix_share(model, table, space) -> dict:
    """The share of a forward's MACs an ideal engine must recompute, averaged over the search's layer choice.

    For each quantized layer: its own MACs plus every layer it reaches (skip connections included), over the
    whole network's; weighted like ``pick_tensors`` picks layers (probability ~ sqrt(size)).
    """
    by_name = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    heavy = {op.get_friendly_name(): macs(op) for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")}
    total = sum(heavy.values())
    shares = []
    for weight in table:
        seen, stack = set(), [by_name[weight.consumer]]
        while stack:
            node = stack.pop()
            if node.get_friendly_name() in seen:
                continue
            seen.add(node.get_friendly_name())
            stack.extend(t.get_node() for out in node.outputs() for t in out.get_target_inputs())
        shares.append(sum(m for name, m in heavy.items() if name in seen) / total)
    p = np.sqrt([t.size for t in space.tensors])
    p = p / p.sum()
    return {"benchmark": "change_spread", "suffix_share_by_layer": [round(x, 3) for x in shares], "expected_suffix_share": float(np.dot(p, shares))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deep_residual_cnn")
    parser.add_argument("--layers", default="spread", help="comma-separated tensor indices, or 'spread' (six across the depth)")
    parser.add_argument("--fractions", default="0.03,0.003")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    from eval_speed import register_deep_residual

    from evoquant import zoo
    from evoquant.data import load_source
    from evoquant.demo import calibration_images
    from evoquant.ir.patch import ConstantPatcher
    from evoquant.ir.runtime import compile_ir, infer, read_ir
    from evoquant.ir.weights import find_quantized_weights
    from evoquant.search.genome import Genome, SearchSpace, apply_shifts
    from evoquant.search.operators import mutate_random

    register_deep_residual()
    built = zoo.build(args.model, calibration=calibration_images())
    model = read_ir(built.int8_xml)
    table = find_quantized_weights(model)
    activations = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() != "Constant"]
    model.add_outputs([op.output(0) for op in activations])
    patcher = ConstantPatcher(model, table)
    images = load_source("fractal").sample(args.batch, zoo.INPUT_SHAPE, seed=1234).images
    parent = infer(compile_ir(model), images)
    space = SearchSpace.from_weights(table)
    print(json.dumps({"model": args.model, **suffix_share(read_ir(built.int8_xml), table, space)}), flush=True)
    layers = [int(i) for i in np.linspace(0, len(table) - 1, 6).round()] if args.layers == "spread" else [int(i) for i in args.layers.split(",")]
    rng = np.random.default_rng(0)
    for tensor in dict.fromkeys(layers):
        for fraction in (float(f) for f in args.fractions.split(",")):
            genome = mutate_random(Genome(), space, rng, fraction=fraction, tensors=1, only=tensor)
            patcher.apply({k: apply_shifts(table[k].states, i, d) for k, (i, d) in genome.payload().items()})
            try:
                outputs = infer(compile_ir(model), images)
            finally:
                patcher.restore()
            changed = [float(np.mean(a != b)) for a, b in zip(outputs[1:], parent[1:])]
            downstream = [round(v, 4) for v in changed if v > 0]  # activations above the layer do not change
            print(json.dumps({
                "benchmark": "change_spread", "model": args.model, "tensor": tensor, "layer": table[tensor].consumer,
                "fraction": fraction, "weights_moved": genome.n_shifts, "changed_share_downstream": downstream,
                "images_with_changed_logits": float(np.mean(np.any(outputs[0] != parent[0], axis=1))),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The full-precision teacher of data-free synthesis: a ``torch.export`` program whose BatchNorm layers are
read as it runs.

A program saved with ``torch.export.save`` (``.pt2``) loads with no model code; its BatchNorm layers are
``aten.batch_norm`` nodes (or the ``_native_batch_norm_legit*`` forms of older exports) whose arguments
hold the running statistics stored during training. :class:`Teacher` runs the graph with an FX
interpreter that, at each such node, records the batch statistics of the node's input next to those
running statistics, and lets gradients flow to the input: what every BN-statistics loss (ZeroQ, GDFQ,
Qimera, ClusterQ) needs. An ``nn.Module`` given from Python is exported first, so both take one path.
TorchScript is refused: its graph cannot be instrumented this way (and forward hooks do not fire inside
scripted code).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evoquant.errors import EvoquantError
from evoquant.gan.models import import_torch


@dataclass
class BNStatistics:
    """One BatchNorm layer on one batch: the batch's per-channel mean and (biased) variance of the layer's
    input, with gradients, and the layer's running statistics (constants)."""

    mean: Any
    var: Any
    running_mean: Any
    running_var: Any
    features: Any = None  # the layer's input itself (N, C, ...), for per-sample statistics (ClusterQ)


def _convolution_strides(torch: Any) -> dict:
    """The convolution ops of an exported graph, each with how to read its stride from the call's arguments."""
    aten = torch.ops.aten

    def conv2d_stride(args, kwargs):
        return args[3] if len(args) > 3 else kwargs.get("stride", 1)

    def convolution_stride(args, kwargs):  # (input, weight, bias, stride, padding, dilation, transposed, ...)
        transposed = args[6] if len(args) > 6 else kwargs.get("transposed", False)
        return 1 if transposed else (args[3] if len(args) > 3 else kwargs.get("stride", 1))

    return {aten.conv2d.default: conv2d_stride, aten.convolution.default: convolution_stride}


def swung(torch: Any, features: Any, swing: int, draw: Any) -> Any:
    """Genie's swing convolution, on a strided convolution's input ``features`` (N, C, H, W): the map shifted
    by a random whole number of pixels in ``[-swing, swing]`` along each spatial axis (the same shift for the
    batch), the uncovered border filled by reflection. A stride-s convolution sees only every s-th position;
    shifting its input from step to step keeps synthesis from tuning pixels to that one sampling grid (the
    checkerboard artefacts Genie's paper saw). A map too small to reflect is left as it is."""
    height, width = features.shape[-2:]
    if features.ndim != 4 or min(height, width) <= swing:
        return features
    dy, dx = (int(value) for value in torch.randint(0, 2 * swing + 1, (2,), generator=draw))
    padded = torch.nn.functional.pad(features, [swing] * 4, mode="reflect")
    return padded[:, :, dy:dy + height, dx:dx + width]


def _batch_norm_targets(torch: Any) -> set:
    aten = torch.ops.aten
    targets = {aten.batch_norm.default, aten.native_batch_norm.default}
    for name in ("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "_native_batch_norm_legit_functional"):
        if hasattr(aten, name):
            targets.add(getattr(aten, name).default)
    return targets


class Teacher:
    """An FP32 classifier as a torch graph whose BatchNorm inputs are observed on every call.

    ``teacher(images01)`` takes images in ``[0, 1]`` (mapped linearly onto ``value_range``, the model's
    input range) of :attr:`image_shape` -- the model's ``input_shape``, or with ``grey`` one channel that is
    repeated over the model's channels (a network fed grey images as RGB) -- returns its logits and a list of :class:`BNStatistics`, one per BatchNorm layer in
    graph order. ``teacher(images01, swing=k, draw=generator)`` shifts the input of every strided
    convolution by up to ``k`` pixels first (:func:`swung`, drawn from the torch ``generator``).
    """

    def __init__(self, module: Any, input_shape: tuple[int, int, int], value_range: tuple[float, float] = (0.0, 1.0), source: str = "the teacher",
                 mean_values: tuple[float, ...] | None = None, scale_values: tuple[float, ...] | None = None, grey: bool = False):
        torch = import_torch()
        self.torch = torch
        self.source = source
        self.input_shape = tuple(int(d) for d in input_shape)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        channels = self.input_shape[0]
        if grey and channels == 1:
            raise EvoquantError(f"--grey: {source} takes one channel already (grey is for a model fed one grey image repeated over several channels)")
        self.grey = bool(grey)
        # what synthesis makes: one grey channel that __call__ repeats, or the model's own channels
        self.image_shape = (1, *self.input_shape[1:]) if self.grey else self.input_shape
        for values, name in ((mean_values, "--mean-values"), (scale_values, "--scale-values")):
            if values is not None and len(values) not in (1, channels):
                raise EvoquantError(f"{name} has {len(values)} values; {source} takes {channels} channels")
        self.mean = None if mean_values is None else torch.tensor(mean_values, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.scale = None if scale_values is None else torch.tensor(scale_values, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.graph_module = module
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        self._targets = _batch_norm_targets(torch)
        self._strides = _convolution_strides(torch)
        self.norm_nodes = [node for node in module.graph.nodes if node.op == "call_function" and node.target in self._targets]
        if not self.norm_nodes:
            raise EvoquantError(f"{source} has no BatchNorm layers: data-free synthesis matches the statistics they stored during training "
                                "(export the model before folding BatchNorm into the convolutions)")
        with torch.no_grad():
            try:
                logits, _ = self(torch.full((2, *self.image_shape), 0.5))
            except EvoquantError:
                raise
            except Exception as error:
                raise EvoquantError(f"{source} does not take inputs of shape (N, {', '.join(map(str, self.input_shape))}): "
                                    f"{' '.join(str(error).split())[:200]} (give --input-shape, and export with a dynamic batch dimension)") from None
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise EvoquantError(f"{source} returns {tuple(logits.shape)}; data-free synthesis needs a classifier returning (N, classes) logits")
        self.num_classes = int(logits.shape[1])

    @property
    def layers(self) -> int:
        return len(self.norm_nodes)

    def to_model_range(self, images01: Any) -> Any:
        """Images in [0, 1] as the model takes them: the range map, then (x - mean) / scale per channel."""
        low, high = self.value_range
        x = images01 * (high - low) + low
        if self.mean is not None:
            x = x - self.mean
        if self.scale is not None:
            x = x / self.scale
        return x

    def __call__(self, images01: Any, *, swing: int = 0, draw: Any = None) -> tuple[Any, list[BNStatistics]]:
        torch = self.torch
        records: list[BNStatistics] = []
        targets = self._targets
        strides = self._strides if swing > 0 else {}

        class Observer(torch.fx.Interpreter):
            def call_function(self, target, args, kwargs):
                if target in strides:
                    stride = strides[target](args, kwargs)
                    if max(stride if isinstance(stride, (list, tuple)) else [stride]) > 1:
                        args = (swung(torch, args[0], swing, draw), *args[1:])
                if target in targets:
                    features = args[0]
                    dims = [0] + list(range(2, features.ndim))
                    records.append(BNStatistics(features.mean(dim=dims), features.var(dim=dims, unbiased=False), args[3].detach(), args[4].detach(), features))
                return super().call_function(target, args, kwargs)

            def call_module(self, target, args, kwargs):
                if str(target).startswith("_guards"):  # torch.export's input-shape guard: shapes are checked above
                    return None
                return super().call_module(target, args, kwargs)

        if self.grey:
            images01 = images01.expand(-1, self.input_shape[0], -1, -1)
        output = Observer(self.graph_module).run(self.to_model_range(images01))
        logits = output[0] if isinstance(output, (tuple, list)) else output
        return logits, records

    def classifier_weight(self) -> Any | None:
        """The weight of the last linear layer, (classes, features), if the graph ends in one (Qimera's
        embedding initialisation)."""
        torch = self.torch
        linear = [node for node in self.graph_module.graph.nodes if node.op == "call_function" and node.target in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)]
        if not linear:
            return None
        node = linear[-1]
        weight_node = node.args[1] if node.target == torch.ops.aten.linear.default else node.args[2]
        if getattr(weight_node, "op", None) != "get_attr":
            return None
        weight = _attribute(self.graph_module, weight_node.target).detach()
        if node.target == torch.ops.aten.addmm.default:
            weight = weight.t()
        return weight if weight.ndim == 2 and weight.shape[0] == self.num_classes else None


def _attribute(module: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def load_teacher(model: Any, input_shape: tuple[int, int, int] | None = None, value_range: tuple[float, float] = (0.0, 1.0),
                 mean_values: tuple[float, ...] | None = None, scale_values: tuple[float, ...] | None = None, grey: bool = False) -> Teacher:
    """A :class:`Teacher` from a ``torch.export`` program file (``.pt2``), an ``ExportedProgram`` or an
    ``nn.Module`` (exported here with a dynamic batch dimension; ``input_shape`` (C, H, W) needed); ``grey``:
    synthesise one channel, repeated over the model's."""
    torch = import_torch()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise EvoquantError(f"no such teacher file: {path}")
        if path.suffix.lower() != ".pt2":
            raise EvoquantError(f"{path}: the teacher must be a torch.export program saved with torch.export.save (.pt2); TorchScript and "
                                "state dicts cannot be instrumented (export the model: torch.export.export(model.eval(), (example,)))")
        try:
            program = torch.export.load(str(path))
        except Exception as error:  # a foreign or damaged file: torch raises several kinds
            raise EvoquantError(f"cannot load {path} as a torch.export program: {' '.join(str(error).split())[:200]}") from None
        source = str(path)
    elif isinstance(model, torch.nn.Module):
        if input_shape is None:
            raise EvoquantError("a torch module as the teacher needs its input shape (C, H, W)")
        program = export_program(model, input_shape)
        source = f"the module {type(model).__name__}"
    else:
        program, source = model, "the program"
    if not hasattr(program, "module"):
        raise EvoquantError(f"{source} is not a torch.export program")
    shape = tuple(input_shape) if input_shape is not None else _program_input_shape(program, source)
    return Teacher(program.module(), shape, value_range, source, mean_values, scale_values, grey)


def export_program(module: Any, input_shape: tuple[int, int, int]) -> Any:
    """``torch.export`` of ``module`` in eval mode with a dynamic batch dimension (what the zoo saves)."""
    torch = import_torch()
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    except Exception as error:
        raise EvoquantError(f"cannot export {type(module).__name__} with torch.export: {' '.join(str(error).split())[:200]}") from None


def _program_input_shape(program: Any, source: str) -> tuple[int, int, int]:
    """The (C, H, W) of a program's single image input, from its example metadata."""
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder" and node.name in set(program.graph_signature.user_inputs)]
    if len(placeholders) != 1:
        raise EvoquantError(f"{source} takes {len(placeholders)} inputs; data-free synthesis needs a classifier of one image input")
    value = placeholders[0].meta.get("val")
    shape = tuple(value.shape) if value is not None else ()
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise EvoquantError(f"{source} takes inputs of shape {shape}; give --input-shape C,H,W")
    return tuple(int(d) for d in shape[1:])

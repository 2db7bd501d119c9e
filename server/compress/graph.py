"""What the converter made of a Keras model: the TFLite graph's operators and which layers each one fused.

The converter folds a batch norm into the convolution before it and fuses the activation after it, so
one CONV_2D can do the work of three Keras layers. Which layers went into which operator can be read
back from the flatbuffer: each operator's output tensor is named after the TensorFlow ops it absorbed
(``model/stem_relu_1/Relu;model/stem_conv_1/convolution``), and those carry the Keras layer names. A
layer named by no operator was folded into constants (a batch norm into the weights of the operator
that reads its input, a dropout into nothing); it is listed with the operator its input came from.

The graph is read with LiteRT's interpreter, without its default delegate, so it shows every operator
of the file (the trial, with XNNPACK, counts how many of them the delegate took).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from shared.errors import ModelError

_SCOPE_SUFFIX = re.compile(r"(.+)_(\d+)$")  # TensorFlow makes name scopes unique: "stem_conv_1"


def graph_report(tflite: bytes, model: Any | None = None) -> dict[str, Any]:
    """``{"ops": {type: count}, "total": n, "fused": [{"op", "layers", "folded"}]}`` for a flatbuffer; the
    fused entries (operators that took more than one Keras layer) only when ``model`` is the Keras model."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interpreter = Interpreter(model_content=tflite,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interpreter.allocate_tensors()
        ops = interpreter._get_ops_details()
        names = {t["index"]: str(t["name"]) for t in interpreter.get_tensor_details()}
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot read the converted graph: {exc}") from exc
    counts = Counter(str(op["op_name"]) for op in ops)
    report: dict[str, Any] = {"ops": dict(sorted(counts.items())), "total": len(ops), "fused": []}
    if model is None:
        return report
    layers = [layer.name for layer in model.layers]
    per_op = [(str(op["op_name"]), _layers_named(";".join(names.get(i, "") for i in op["outputs"]), layers))
              for op in ops]
    named = {layer for _, found in per_op for layer in found}
    folded = _folded_into(model, [layer for layer in layers if layer not in named])
    for op_name, found in per_op:
        extra = [layer for layer, into in folded.items() if into in found]
        if len(found) + len(extra) > 1:
            report["fused"].append({"op": op_name, "layers": found, "folded": extra})
    return report


def _layers_named(tensor_name: str, layers: list[str]) -> list[str]:
    """The Keras layers a tensor name mentions, each once."""
    known = set(layers)
    found: list[str] = []
    for part in tensor_name.split(";"):
        for component in part.split("/"):
            match = _SCOPE_SUFFIX.fullmatch(component)
            layer = match.group(1) if match and match.group(1) in known else component if component in known else None
            if layer is not None and layer not in found:
                found.append(layer)
    return sorted(found, key=layers.index)  # in the model's order, not the converter's


def _folded_into(model: Any, unnamed: list[str]) -> dict[str, str]:
    """For each layer no operator names that has weights or work (a batch norm, say): the layer its input
    came from, whose operator now does its work."""
    from server.compress.structured import layer_graph

    _, consumers, _ = layer_graph(model)
    parent = {after: before for before, afters in consumers.items() for after in afters}
    folded: dict[str, str] = {}
    for layer in unnamed:
        source = parent.get(layer)
        while source is not None and source in unnamed:  # a chain of folded layers: the first real operator
            source = parent.get(source)
        if source is not None and type(model.get_layer(layer)).__name__ != "InputLayer":
            folded[layer] = source
    return folded


def describe_graph(graph: dict[str, Any], undelegated: int | None, partitions: int | None) -> list[str]:
    """Lines for ``model report --ops``: operator counts, XNNPACK coverage, then what each fused operator holds."""
    counts = ", ".join(f"{op} {n}" for op, n in graph["ops"].items())
    lines = [f"{graph['total']} ops ({counts})"]
    if undelegated is not None:
        delegated = graph["total"] - undelegated
        lines[0] += (f"; XNNPACK took {delegated}/{graph['total']} in {partitions or 0} partition"
                     f"{'' if partitions == 1 else 's'}")
    for fused in graph["fused"]:
        held = " + ".join(fused["layers"])
        if fused["folded"]:
            held += " (" + ", ".join(fused["folded"]) + " folded in)"
        lines.append(f"{fused['op']} <- {held}")
    return lines

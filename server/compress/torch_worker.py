"""PyTorch models in: inspect, run, convert and quantize a ``torch.export`` program, as a child process.

``python -m server.compress.torch_worker`` reads one JSON request on stdin and
prints one JSON line: ``{"ok": true, ...}`` or ``{"ok": false, "kind":
"user_input" | "model" | "missing", "error": "<one line>"}``. Requests:

- ``{"op": "inspect", "program": P}`` -> ``input_shape`` (without the batch
  dimension) and ``num_classes``;
- ``{"op": "predict", "program": P, "x": X.npy, "out": Y.npy}``: top-1 classes
  of the PyTorch model itself on the samples in ``X``;
- ``{"op": "convert", "program": P, "out": F.tflite}``: the float32 flatbuffer,
  converted with litert-torch;
- ``{"op": "quantize", "float": F.tflite, "quantization": Q, "samples": S.npy,
  "out": O.tflite}``: the float flatbuffer quantized with ai-edge-quantizer
  (static int8 and int16x8 calibrated on ``S``).

torch, litert-torch and ai-edge-quantizer are the ``edgefleet[torch]`` extra.
They never enter the server process: importing torch beside TensorFlow costs
seconds and hundreds of MiB, and the Python this runs in may be another venv
(``EDGEFLEET_TORCH_PYTHON``) whose packages do not have to agree with the
server's. So this module imports only numpy and the standard library at the top.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import one_line

logger = logging.getLogger(__name__)

INSTALL_HINT = "PyTorch models need the torch extra: pip install 'edgefleet[torch]'"
SIGNATURE = "serving_default"  # the one signature litert-torch gives a converted module


class TorchFailure(Exception):
    def __init__(self, message: str, kind: str = "model") -> None:
        super().__init__(message)
        self.kind = kind


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise TorchFailure(f"{INSTALL_HINT} ({exc})", kind="missing") from exc


# -- the ExportedProgram -------------------------------------------------------------------


def load_program(path: str) -> Any:
    torch = _import("torch")
    try:
        program = torch.export.load(path)
    except Exception as exc:  # zipfile, pickle and schema errors all mean "not a .pt2 program"
        raise TorchFailure(
            f"{Path(path).name} is not a torch.export program (save one with "
            f"torch.export.save(torch.export.export(model.eval(), (sample,)), 'model.pt2')): {one_line(exc)}",
            kind="user_input",
        ) from exc
    return program


def sample_input(program: Any) -> Any:
    """The program's one example input (a float tensor), from ``example_inputs`` or the graph's placeholder."""
    torch = _import("torch")
    examples = getattr(program, "example_inputs", None)
    if examples is not None:
        args, kwargs = examples
        tensors = [*args, *kwargs.values()]
    else:
        names = set(program.graph_signature.user_inputs)
        tensors = [node.meta["val"] for node in program.graph.nodes if node.op == "placeholder" and node.name in names]
        tensors = [torch.zeros(tuple(int(d) for d in t.shape), dtype=t.dtype) for t in tensors]
    if len(tensors) != 1 or not isinstance(tensors[0], torch.Tensor):
        raise TorchFailure(f"expected a program with one tensor input, got {len(tensors)} inputs", kind="user_input")
    sample = tensors[0]
    if not sample.dtype.is_floating_point:
        raise TorchFailure(f"expected a float model input, got {sample.dtype}", kind="user_input")
    if sample.dim() < 2:
        raise TorchFailure(f"expected an input with a batch dimension, got shape {tuple(sample.shape)}",
                           kind="user_input")
    return sample.to(torch.float32)


def run_module(module: Any, x: Any) -> Any:
    torch = _import("torch")
    with torch.no_grad():
        try:
            out = module(x)
        except Exception as exc:  # any error of the user's graph on its own inputs
            raise TorchFailure(f"the PyTorch model failed to run: {one_line(exc)}") from exc
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TorchFailure(f"expected the model to return one tensor, got {type(out).__name__}", kind="user_input")
    return out


def inspect(request: dict[str, Any]) -> dict[str, Any]:
    program = load_program(request["program"])
    sample = sample_input(program)
    out = run_module(program.module(), sample)
    if out.dim() != 2 or out.shape[1] < 2:
        raise TorchFailure(
            f"expected a classifier whose output is (batch, classes) with 2 or more classes, got {tuple(out.shape)}",
            kind="user_input",
        )
    return {"input_shape": [int(d) for d in sample.shape[1:]], "num_classes": int(out.shape[1])}


def _fixed_batch(program: Any) -> int | None:
    """The batch size the program was exported with, or None when its batch dimension is dynamic."""
    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            first = node.meta["val"].shape[0]
            return int(first) if isinstance(first, int) else None  # a torch.SymInt when dynamic
    return None


def predict(request: dict[str, Any]) -> dict[str, Any]:
    torch = _import("torch")
    program = load_program(request["program"])
    module = program.module()
    x = np.load(request["x"], allow_pickle=False).astype(np.float32)
    batch = _fixed_batch(program) or 256
    classes = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *x.shape[1:]), np.float32)])
        scores = run_module(module, torch.from_numpy(padded)).numpy()[: len(chunk)]
        classes.append(np.argmax(scores, axis=-1))
    np.save(request["out"], np.concatenate(classes).astype(np.int64) if classes else np.zeros(0, np.int64))
    return {"samples": len(x)}


def convert(request: dict[str, Any]) -> dict[str, Any]:
    litert_torch = _import("litert_torch")
    program = load_program(request["program"])
    sample = sample_input(program)[:1]  # the device runs one sample at a time
    try:
        converted = litert_torch.convert(program.module(), (sample,))
        flatbuffer = bytes(converted.model_content())
    except Exception as exc:  # lowering and MLIR errors of every kind
        raise TorchFailure(f"litert-torch could not convert the model: {one_line(exc)}") from exc
    Path(request["out"]).write_bytes(flatbuffer)
    return {"bytes": len(flatbuffer)}


# -- quantization of the float flatbuffer ---------------------------------------------------


def quantization_recipe(quantization: str) -> Any:
    """The ai-edge-quantizer recipe for one of edgefleet's quantization names."""
    recipe = _import("ai_edge_quantizer.recipe")
    recipe_manager = _import("ai_edge_quantizer.recipe_manager")
    qtyping = _import("ai_edge_quantizer.qtyping")
    if quantization == "dynamic_range":  # int8 weights of the larger tensors, as TensorFlow's converter does
        return recipe.dynamic_legacy_wi8_afp32()
    if quantization == "int8":  # int8 weights and activations, int8 input and output
        return recipe.static_wi8_ai8()
    if quantization == "int16x8":
        return recipe.static_wi8_ai16()
    if quantization == "float16":
        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16,
                                       algorithm_key=recipe.AlgorithmName.FLOAT_CASTING)
        return manager.get_quantization_recipe()
    raise TorchFailure(f"no ai-edge-quantizer recipe for {quantization!r}", kind="user_input")


def quantize(request: dict[str, Any]) -> dict[str, Any]:
    quantizer = _import("ai_edge_quantizer.quantizer")
    float_model = Path(request["float"]).read_bytes()
    recipe = quantization_recipe(request["quantization"])
    try:
        q = quantizer.Quantizer(float_model, recipe)
        calibration = None
        if q.need_calibration:
            samples = np.load(request["samples"], allow_pickle=False).astype(np.float32)
            name = _input_name(float_model)
            calibration = q.calibrate({SIGNATURE: [{name: s[np.newaxis, ...]} for s in samples]}, num_threads=1)
        flatbuffer = bytes(q.quantize(calibration, enable_progress_report=False).quantized_model)
    except TorchFailure:
        raise
    except Exception as exc:  # the quantizer's validation and MLIR errors
        raise TorchFailure(f"ai-edge-quantizer could not quantize to {request['quantization']}: "
                           f"{one_line(exc)}") from exc
    Path(request["out"]).write_bytes(flatbuffer)
    return {"bytes": len(flatbuffer)}


def _input_name(flatbuffer: bytes) -> str:
    interpreter = _import("ai_edge_litert.interpreter")
    signatures = interpreter.Interpreter(model_content=flatbuffer).get_signature_list()
    inputs = signatures.get(SIGNATURE, {}).get("inputs", [])
    if len(inputs) != 1:
        raise TorchFailure(f"the converted model's {SIGNATURE} signature has {len(inputs)} inputs, expected one")
    return str(inputs[0])


OPERATIONS = {"inspect": inspect, "predict": predict, "convert": convert, "quantize": quantize}


# -- entry point ---------------------------------------------------------------------------


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result_fd = os.dup(1)
    os.dup2(2, 1)  # litert-torch prints its progress to stdout; stdout carries the result only
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(relativeCreated)6.0f ms %(message)s")
    try:
        request = json.loads(sys.stdin.read())
        operation = OPERATIONS.get(request.get("op")) if isinstance(request, dict) else None
        if operation is None:
            raise TorchFailure(f"unknown request: {request!r:.200}")
        result = {"ok": True, **operation(request)}
    except TorchFailure as exc:
        result = {"ok": False, "kind": exc.kind, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a bug or a broken environment: one line out, the traceback to stderr
        traceback.print_exc()
        result = {"ok": False, "kind": "model", "error": f"the PyTorch worker failed: {type(exc).__name__}: "
                                                        f"{one_line(exc)}"}
    os.write(result_fd, (json.dumps(result) + "\n").encode())
    os.close(result_fd)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

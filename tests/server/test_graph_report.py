"""The graph report: a converted model's operators, and the Keras layers each operator took over."""

from __future__ import annotations

from typing import Any

import pytest

from server.compress.convert import convert
from server.compress.digits import build_digits_resnet, digits_split
from server.compress.graph import describe_graph, graph_report
from server.compress.quantization import Quantization
from shared.errors import ModelError


@pytest.fixture(scope="module")
def residual() -> Any:
    return build_digits_resnet(width=8, blocks=1)


def test_batch_norms_and_activations_are_shown_inside_the_operators_that_took_them(residual: Any) -> None:
    train, _ = digits_split()
    graph = graph_report(convert(residual, Quantization.INT8, train.x[:64]), residual)
    assert graph["ops"] == {"ADD": 1, "CONV_2D": 3, "FULLY_CONNECTED": 2, "MEAN": 1, "SOFTMAX": 1}
    assert graph["total"] == 8
    assert graph["fused"] == [
        {"op": "CONV_2D", "layers": ["stem_conv", "stem_relu"], "folded": ["stem_bn"]},
        {"op": "CONV_2D", "layers": ["block0_conv1", "block0_relu1"], "folded": ["block0_bn1"]},
        {"op": "CONV_2D", "layers": ["block0_conv2"], "folded": ["block0_bn2"]},
        {"op": "ADD", "layers": ["block0_add", "block0_out"], "folded": []},
    ]
    lines = describe_graph(graph, undelegated=1, partitions=1)
    assert lines[0] == "8 ops (ADD 1, CONV_2D 3, FULLY_CONNECTED 2, MEAN 1, SOFTMAX 1); XNNPACK took 7/8 in 1 partition"
    assert lines[1:3] == ["CONV_2D <- stem_conv + stem_relu (stem_bn folded in)",
                          "CONV_2D <- block0_conv1 + block0_relu1 (block0_bn1 folded in)"]


def test_without_the_keras_model_only_the_operators_are_counted(residual: Any) -> None:
    train, _ = digits_split()
    graph = graph_report(convert(residual, Quantization.FLOAT32, train.x[:64]))
    assert graph["total"] == sum(graph["ops"].values()) and graph["fused"] == []


def test_a_file_that_is_no_model_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="cannot read the converted graph"):
        graph_report(b"not a flatbuffer")

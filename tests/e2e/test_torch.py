"""End to end: a PyTorch model, trained here, goes from ``model add`` to a committed install on a real agent.

The CNN is trained and exported (``torch.export``) in the torch venv; the CLI
converts it with litert-torch in that venv (``EDGEFLEET_TORCH_PYTHON``), builds
and measures the rpi4 variants, signs the chosen one and rolls it out over a
real Mosquitto to an agent process, which verifies, trials and commits it. The
on-device accuracy is held to the PyTorch model's own accuracy on the same
samples (the eval slice that travels with the artifact).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from server.broker import Mosquitto
from server.compress.torch_source import PYTHON_VARIABLE
from tests.e2e.fleet import QUICK_AGENT_TOML, Fleet, cli, expect_state
from tests.torch_env import TorchDigits, torch_python, train_torch_digits

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("torch-fleet")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PYTHON_VARIABLE, torch_python())
        fleet = Fleet(root, Mosquitto(root / "broker").start(), root / "server")
        try:
            cli("init", "--data-dir", str(fleet.data_dir), "--release-key", "online")
            fleet.register("pi", "rpi4", extra_toml=QUICK_AGENT_TOML)
            fleet.start_agent("pi")
            fleet.start_server()
            fleet.wait_online("pi")
            yield fleet
        finally:
            fleet.stop()
            fleet.broker.stop()


@pytest.fixture(scope="module")
def digits(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> TorchDigits:
    return train_torch_digits(tmp_path_factory.mktemp("torch-digits"))


def test_a_pytorch_model_is_built_rolled_out_and_committed_within_a_point_of_its_own_accuracy(
    fleet: Fleet, digits: TorchDigits
) -> None:
    data = ("--data-dir", str(fleet.data_dir))
    added = cli("model", "add", "tdigits", "--file", str(digits.program), "--eval", str(digits.eval), *data)
    assert added.startswith("tdigits:1  (10 classes")
    cli("model", "build", "tdigits", "--profile", "rpi4", *data)
    (report,) = json.loads(cli("model", "report", "tdigits:1", "--profile", "rpi4", "--json", *data))
    assert {v["recipe"] for v in report["variants"]} == {"int8", "dynamic_range", "float16", "float32"}
    (chosen,) = [v for v in report["variants"] if v["chosen"]]

    rollout = cli("rollout", "start", "tdigits", "--profile", "rpi4", *data).strip()
    status = expect_state(fleet.wait_settled(rollout), "succeeded")
    (device,) = status["devices"]
    assert device["state"] == "committed"
    assert (device["quantization"], device["size_bytes"]) == (chosen["recipe"], chosen["size_bytes"])
    assert abs(device["accuracy"] - digits.accuracy) <= 0.01, (device["accuracy"], digits.accuracy)
    listed = fleet.device_list()["pi"]
    assert (listed["active_model"], listed["active_version"]) == ("tdigits", 1)

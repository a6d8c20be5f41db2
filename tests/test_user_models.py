"""Users' own SpikingJelly models through ``binslt search --model FILE.py:FACTORY`` on digits.

Small models written as a user writes them: dropouts (SpikingJelly's ``layer.Dropout``, torch's
``nn.Dropout`` in a hand-written forward), average pooling, linear stacks, flatten, and a neuron
binslt does not model (``ParametricLIFNode``, left as it is). Each:

* runs end to end (conversion report, search epochs, checkpoint, ticket) and its ticket
  evaluates to the run's own model;
* resumes exactly after a kill: a run in a subprocess is killed (SIGKILL) as soon as its first
  checkpoint exists, resumed with ``--resume``, and ends with the same state dict (every tensor
  equal) and the same accuracies as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from binslt import cli

USER_MODELS = '''
import torch
from torch import nn
from spikingjelly.activation_based import layer, neuron, surrogate


def mlp(num_classes=10):
    """A linear stack: flatten, two spiking hidden layers with SpikingJelly dropouts."""
    return nn.Sequential(
        layer.Flatten(),
        layer.Linear(64, 48), layer.BatchNorm1d(48), neuron.LIFNode(tau=2.0),
        layer.Dropout(0.25),
        layer.Linear(48, 32), layer.BatchNorm1d(32), neuron.LIFNode(tau=2.0),
        layer.Dropout(0.25),
        layer.Linear(32, num_classes))


def avgpool_cnn(num_classes=10):
    """Convs with BN, IF and LIF neurons, average pooling, a global average pool."""
    return nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.IFNode(),
        layer.AvgPool2d(2),
        layer.Conv2d(8, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid()),
        layer.AdaptiveAvgPool2d((1, 1)), layer.Flatten(), layer.Linear(16, num_classes))


class PLIFNet(nn.Module):
    """A learnt-tau neuron binslt does not model, next to LIF layers and a max pool."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = layer.Conv2d(1, 8, 3, padding=1)
        self.bn1 = layer.BatchNorm2d(8)
        self.plif = neuron.ParametricLIFNode()
        self.conv2 = layer.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = layer.BatchNorm2d(8)
        self.lif2 = neuron.LIFNode(tau=2.0)
        self.pool = layer.MaxPool2d(2)
        self.fc1 = layer.Linear(8 * 4 * 4, 32)
        self.bn3 = layer.BatchNorm1d(32)
        self.lif3 = neuron.LIFNode(tau=2.0)
        self.fc2 = layer.Linear(32, num_classes)

    def forward(self, x):
        x = self.plif(self.bn1(self.conv1(x)))
        x = self.pool(self.lif2(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 2)
        return self.fc2(self.lif3(self.bn3(self.fc1(x))))


def plif_net(num_classes=10):
    return PLIFNet(num_classes)


class DropoutForward(nn.Module):
    """torch.nn layers in SpikingJelly's multi-step idiom, torch's dropout in the forward."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = layer.SeqToANNContainer(nn.Conv2d(1, 8, 3, padding=1, bias=False),
                                            nn.BatchNorm2d(8))
        self.sn1 = neuron.LIFNode(tau=2.0)
        self.drop = nn.Dropout(0.2)
        self.fc1 = layer.SeqToANNContainer(nn.Linear(8 * 8 * 8, 32), nn.BatchNorm1d(32))
        self.sn2 = neuron.LIFNode(tau=2.0)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        s = self.sn1(self.conv(x))
        s = self.drop(s.flatten(2))
        return self.fc2(self.sn2(self.fc1(s)))


def dropout_forward(num_classes=10):
    return DropoutForward(num_classes)
'''

#: factory -> what its conversion report must say
EXPECT = {
    "mlp": ["1 + 2 + 3 -> BinSpikeLinear", "SpikeDropout", "input=spike-dropout"],
    "avgpool_cnn": ["neuron=if", "input=real", "BinLinear"],
    "plif_net": ["plif (ParametricLIFNode)", "is not binslt's LIF or IF neuron"],
    "dropout_forward": ["SpikeDropout", "input=spike-dropout", "conv.0 + conv.1 + sn1 -> BinSpikeConv2d", "fc1.0 + fc1.1 + sn2"],
}

RUN = ["--train-subset", "256", "--test-subset", "64", "--batch-size", "32", "--epochs", "3",
       "--timesteps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def models_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "user_models.py"
    path.write_text(USER_MODELS)
    return path


def _env() -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _killed_after_first_checkpoint(spec: str, out: Path) -> int:
    """Starts the run in a subprocess, SIGKILLs it once OUT/checkpoint.pt exists; returns the
    exit status (-9 when it was killed)."""
    proc = subprocess.Popen([sys.executable, "-m", "binslt", "search", "--model", spec, *RUN,
                             "--out", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoint.pt").exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before its first checkpoint: "
                                     f"{proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
        proc.stderr.close()


@pytest.mark.parametrize("factory", sorted(EXPECT))
def test_user_model_searches_end_to_end_and_resumes_after_a_kill(models_file, tmp_path,
                                                                 factory):
    spec = f"{models_file}:{factory}"
    out = tmp_path / "whole"
    assert cli.main(["search", "--model", spec, *RUN, "--out", str(out)]) == 0
    report = (out / "report.txt").read_text()
    for want in EXPECT[factory]:
        assert want in report, (want, report)
    res = json.loads((out / "results.json").read_text())
    assert res["arch"] == "custom" and res["epochs"] == 3
    # the ticket rebuilds the model from the recorded factory: the run's own logits
    from binslt.io.artifacts import load_model
    from binslt.io.tickets import load_ticket

    model, _ = load_model(out)
    ticket = load_ticket(out / "ticket.safetensors")
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ticket(x), model(x))
    assert cli.main(["eval", str(out / "ticket.safetensors"), "--limit", "64"]) == 0

    killed = tmp_path / "killed"
    status = _killed_after_first_checkpoint(spec, killed)
    assert status == -signal.SIGKILL, status
    assert not (killed / "results.json").exists()
    done = len(torch.load(killed / "checkpoint.pt", weights_only=True)["history"])
    assert 1 <= done < 3
    assert cli.main(["search", "--model", spec, *RUN, "--out", str(killed), "--resume"]) == 0
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rb = json.loads((killed / "results.json").read_text())
    for key in ("test_acc", "best_test_acc", "final_train_acc"):
        assert rb[key] == res[key], key
    assert len(a["history"]) == 3
    assert len({h["train_loss"] for h in a["history"]}) > 1  # the scores train
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert ha[key] == hb[key], (key, ha, hb)

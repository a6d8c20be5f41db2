"""``binslt eval`` / ``binslt energy`` on tickets of SpikingJelly models: ``--model
FILE.py:FACTORY`` gives the structure of a ticket written by ``binslt.export_ticket`` after
``binslt.convert`` in Python, and replaces the factory a ``binslt search --model`` ticket
records (which is used by default)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import sj_modules
from torch import nn

import binslt
from binslt import cli
from binslt.training import data

functional, layer, neuron = sj_modules("functional", "layer", "neuron")

MODEL_FILE = '''
from torch import nn
from spikingjelly.activation_based import layer, neuron


def small():
    return nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode(tau=2.0),
        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(8 * 4 * 4, 10))


def narrower():
    return nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.LIFNode(tau=2.0),
        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(4 * 4 * 4, 10))


def broken():
    raise RuntimeError("no such layer")
'''
T, LIMIT = 3, 40


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """(factory file, ticket of its converted ``small()`` exported from Python, the digits
    test images and labels the commands see with --limit)."""
    d = tmp_path_factory.mktemp("user")
    path = d / "my_model.py"
    path.write_text(MODEL_FILE)
    ns: dict = {}
    exec(compile(MODEL_FILE, str(path), "exec"), ns)  # the same definitions, in this process
    torch.manual_seed(0)
    sj = ns["small"]()
    functional.set_step_mode(sj, "m")
    net, _ = binslt.convert(sj, 0.5, example_input=torch.rand(T, 2, 1, 8, 8))
    bundle = data.load("digits", image_size=8)
    ds = data.evaluation_split(bundle, "test", LIMIT)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    # BN statistics of the digits themselves: the untrained layers fire and the logits differ
    binslt.models.set_mode(net, "frozen")
    bn = net[0].bn
    bn.momentum = None
    bn.reset_running_stats()
    functional.reset_net(net)
    with torch.no_grad():
        net.train()(xs.unsqueeze(0).repeat(T, 1, 1, 1, 1))
    functional.reset_net(net)
    ticket = d / "small.safetensors"
    binslt.export_ticket(net.eval(), ticket)
    return path, ticket, xs, ys, ns


def python_eval(ticket, factory, xs, ys) -> tuple[int, float]:
    """(correct, mean loss) of the ticket loaded in Python, images repeated over T."""
    model = factory()
    functional.set_step_mode(model, "m")
    net = binslt.load_ticket(ticket, model=model)
    functional.reset_net(net)
    with torch.no_grad():
        logits = net(xs.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0)
    return int((logits.argmax(1) == ys).sum()), float(F.cross_entropy(logits, ys))


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_eval_with_model_equals_python_eval(user, capsys):
    path, ticket, xs, ys, ns = user
    assert cli.main(["eval", str(ticket), "--model", f"{path}:small", "--data", "digits",
                     "--limit", str(LIMIT), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    correct, loss = python_eval(ticket, ns["small"], xs, ys)
    assert res["examples"] == LIMIT and res["arch"] == "converted"
    assert res["correct"] == correct and res["accuracy"] == 100.0 * correct / LIMIT
    assert res["loss"] == pytest.approx(loss, rel=1e-6)
    assert 0 < correct < LIMIT  # not a constant prediction


def test_energy_with_model(user, tmp_path, capsys):
    path, ticket, *_ = user
    out = tmp_path / "e.json"
    assert cli.main(["energy", str(ticket), "--model", f"{path}:small", "--dataset", "digits",
                     "--batch-size", "16", "--batches", "2", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    layers = {r["name"]: r for r in rep["layers"]}
    assert rep["samples"] == 32 and layers["net.0"]["kind"] == "BinSpikeConv2d"
    assert layers["net.5.0"]["input"] == "spike" and layers["net.5.0"]["input_rate"] > 0
    assert rep["build_config"]["arch"] == "converted"


def test_search_model_ticket_uses_its_factory_and_model_replaces_it(user, tmp_path, capsys):
    from binslt.interop.user_model import build_user_model

    path, *_ = user
    mine = tmp_path / "mine.py"
    shutil.copy(path, mine)
    torch.manual_seed(1)
    run = build_user_model(f"{mine}:small", num_classes=10, input_shape=(1, 8, 8),
                           timesteps=2, prune_rate=0.5)
    ticket = tmp_path / "run.safetensors"
    binslt.export_ticket(run, ticket)
    args = ["eval", str(ticket), "--limit", str(LIMIT), "--json"]
    assert cli.main(args) == 0  # the recorded factory
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mine.unlink()
    assert cli.main(args) == 2
    assert "no such file" in one_error_line(capsys)
    assert cli.main([*args, "--model", f"{path}:small"]) == 0  # the same code, elsewhere
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["correct"], again["loss"]) == (first["correct"], first["loss"])
    assert cli.main([*args, "--model", f"{path}:narrower"]) == 2
    assert "does not match its config" in one_error_line(capsys)


def test_model_errors_are_one_line(user, tmp_path, capsys):
    path, ticket, *_ = user
    cases = [
        ([], "give --model FILE.py:FACTORY"),
        (["--model", f"{path}:narrower"], "does not match its config (converted)"),
        (["--model", f"{path}:nothing"], "has no function 'nothing'"),
        (["--model", f"{path}:broken"], "broken() in"),
        (["--model", f"{tmp_path / 'missing.py'}:small"], "no such file"),
        (["--model", str(path)], "FILE.py:FACTORY"),
    ]
    for extra, msg in cases:
        for cmd in (["eval", str(ticket), "--limit", "8"], ["energy", str(ticket)]):
            assert cli.main([*cmd, *extra]) == 2, (cmd, extra)
            assert msg in one_error_line(capsys), (cmd, extra)
    conv4 = tmp_path / "conv4.safetensors"
    binslt.export_ticket(binslt.models.build("conv4", "binwslt", num_classes=10, in_channels=1,
                                             input_size=8, timesteps=2), conv4)
    assert cli.main(["eval", str(conv4), "--model", f"{path}:small"]) == 2
    assert "--model is for tickets of SpikingJelly models" in one_error_line(capsys)
    assert cli.main(["energy", "--model", f"{path}:small"]) == 2
    assert "give the ticket too" in one_error_line(capsys)


def test_converted_model_loaded_by_the_cli_is_the_python_one(user):
    from binslt.cli.common import load_model

    path, ticket, xs, _ys, ns = user
    model, source = load_model(ticket, factory=f"{path}:small")
    assert isinstance(model.net, nn.Sequential) and model.timesteps == T
    assert source["build_config"]["input_shape"] == [1, 8, 8]
    ref = ns["small"]()
    functional.set_step_mode(ref, "m")
    net = binslt.load_ticket(ticket, model=ref)
    functional.reset_net(net)
    with torch.no_grad():
        assert torch.equal(model(xs[:5]), net(xs[:5].unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0))

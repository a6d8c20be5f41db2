"""binslt.io.artifacts (run directories, checkpoints, rebuilding, devices, evaluation), the named
steps of binslt.training.loop, and that only the command line parses arguments or exits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from binslt.io import artifacts, tickets
from binslt.io.artifacts import ArtifactError, RunDir
from binslt.nn import models
from binslt.training import loop as train

ROOT = Path(__file__).resolve().parents[1]


def _tiny_model(method: str = "binwslt") -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("conv4", method, num_classes=10, in_channels=1, input_size=8,
                        timesteps=2)


def _data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,),
                                                                            generator=g))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_atomic_writes_replace_and_leave_no_temporaries(tmp_path):
    p = tmp_path / "f.json"
    artifacts.atomic_write_json({"a": 1}, p)
    artifacts.atomic_write_json({"a": 2}, p)
    assert p.read_text() == '{\n  "a": 2\n}\n'
    artifacts.atomic_torch_save({"t": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(artifacts.load_torch_file(tmp_path / "t.pt", "test")["t"], torch.arange(3))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.json", "t.pt"]


def test_one_error_type_that_names_the_file(tmp_path):
    assert issubclass(tickets.TicketError, ArtifactError) and issubclass(ArtifactError,
                                                                         ValueError)
    missing = tmp_path / "nope.pt"
    with pytest.raises(ArtifactError, match="not found") as ei:
        artifacts.load_torch_file(missing, "checkpoint")
    assert str(missing) in str(ei.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ArtifactError, match="no dict inside"):
        artifacts.load_torch_file(tmp_path / "list.pt", "checkpoint")
    with pytest.raises(ArtifactError, match="holds no checkpoint.pt"):
        artifacts.resolve_source(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="results.json is unreadable"):
        RunDir(tmp_path).read_results()


def test_load_torch_file_runs_no_code(tmp_path):
    """A pickle that would run code on load is refused (weights_only=True), not executed."""
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemError('code ran')",))

    torch.save({"x": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match="corrupt or not a binslt file") as ei:
        artifacts.load_torch_file(tmp_path / "evil.pt", "checkpoint")
    assert str(tmp_path / "evil.pt") in str(ei.value)
    # torch's advice to load with weights_only=False is not passed on; its reason is
    assert "weights_only" not in str(ei.value) and "does not unpickle objects" in str(ei.value)
    assert "\n" not in str(ei.value)
    torch.save({"m": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(ArtifactError, match=r"pickles a Python object, "
                       r"torch\.nn\.modules\.linear\.Linear"):
        artifacts.load_torch_file(tmp_path / "module.pt", "checkpoint")
    (tmp_path / "script.py").write_text("import os\nprint('hello')\n")
    with pytest.raises(ArtifactError, match=r"not a torch\.save file of tensors\)$"):
        artifacts.load_torch_file(tmp_path / "script.py", "checkpoint")


def test_run_directory_sources(tmp_path):
    model = _tiny_model()
    run = RunDir(tmp_path)
    artifacts.atomic_torch_save({"format": artifacts.CHECKPOINT_FORMAT, "config": {"seed": 3},
                                 "build_config": dict(model.build_config), "epoch": 1,
                                 "model": model.state_dict()}, run.checkpoint)
    assert artifacts.resolve_source(tmp_path) == run.checkpoint
    assert run.saved_config() == {"seed": 3}
    loaded, src = artifacts.load_model(tmp_path)
    assert src["path"] == str(run.checkpoint) and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # A packed ticket has no latent weights: it cannot be a checkpoint (finetune, export).
    train.save_ticket(model, tmp_path)
    with pytest.raises(ArtifactError, match="packed ticket: it keeps no latent weights"):
        artifacts.load_source(run.ticket)


def test_rebuild_and_load_state_errors_name_the_file(tmp_path):
    model = _tiny_model()
    bad_cfg = dict(model.build_config, arch="nope")
    with pytest.raises(ArtifactError, match="does not build a network") as ei:
        artifacts.rebuild_model(bad_cfg, path=tmp_path / "x.pt")
    assert str(tmp_path / "x.pt") in str(ei.value)
    with pytest.raises(tickets.TicketError):
        artifacts.rebuild_model(bad_cfg, error=tickets.TicketError)
    other = models.build("conv4", "binwslt", num_classes=7, in_channels=1, input_size=8,
                         timesteps=2)
    with pytest.raises(ArtifactError, match="do not match its build config .*classifier"):
        artifacts.load_state(other, model.state_dict(), tmp_path / "x.pt")


def test_resolve_device():
    assert artifacts.resolve_device("cpu") == torch.device("cpu")
    assert artifacts.resolve_device("auto").type == ("cuda" if torch.cuda.is_available()
                                                     else "cpu")
    with pytest.raises(ArtifactError, match="--device"):
        artifacts.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="no CUDA device"):
            artifacts.resolve_device("cuda:0")


def test_evaluate_matches_a_direct_computation():
    model = _tiny_model("ann").eval()
    ds = _data(20)
    loss, acc = artifacts.evaluate(model, DataLoader(ds, batch_size=7), torch.device("cpu"))
    with torch.no_grad():
        logits = model(ds.tensors[0])
    want_loss = F.cross_entropy(logits.double(), ds.tensors[1]).item()
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == ds.tensors[1]).float().mean().item())
    summed, correct, n = artifacts.evaluate_counts(model, DataLoader(ds, batch_size=7),
                                                   torch.device("cpu"))
    assert n == 20 and correct == round(acc * n / 100)
    # all_reduce sees the float64 totals and may change them (a sum over processes)
    doubled = artifacts.evaluate_counts(model, DataLoader(ds, batch_size=7),
                                        torch.device("cpu"), all_reduce=lambda t: t.mul_(2))
    assert doubled[1:] == (2 * correct, 2 * n)


# ---------------------------------------------------------------------------------------------
# The training loop's steps
# ---------------------------------------------------------------------------------------------


def test_prepare_output_skips_refuses_and_clears(tmp_path):
    cfg = train.RunConfig(epochs=1)
    run, info, logs = RunDir(tmp_path / "r"), train.DistInfo(), []
    assert train.prepare_output(cfg, run, info, resume=False, overwrite=False,
                                log=logs.append) == (None, None)
    assert run.path.is_dir()
    artifacts.atomic_write_json({"config": cfg.to_dict(), "test_acc": 50.0}, run.results)
    done, ckpt = train.prepare_output(cfg, run, info, resume=False, overwrite=False,
                                      log=logs.append)
    assert done["test_acc"] == 50.0 and ckpt is None and "finished earlier" in logs[-1]
    other = train.RunConfig(epochs=1, seed=5)
    with pytest.raises(train.RunError, match="already holds a different run"):
        train.prepare_output(other, run, info, resume=False, overwrite=False, log=logs.append)
    run.ticket.write_bytes(b"old")
    assert train.prepare_output(other, run, info, resume=False, overwrite=True,
                                log=logs.append) == (None, None)
    assert not run.results.exists() and not run.ticket.exists()


def test_make_optimizer_and_one_epoch():
    model = _tiny_model()
    opt, sched = train.make_optimizer(train.RunConfig(epochs=4, lr=0.2), model)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.2
    adam, _ = train.make_optimizer(train.RunConfig(optimizer="adam"), model)
    assert isinstance(adam, torch.optim.Adam)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith("scores") for n in trained)  # search trains scores only
    before = {n: p.detach().clone() for n, p in trained.items()}
    steps: list[int] = []
    loss, acc = train.train_one_epoch(model, DataLoader(_data(24), batch_size=8), opt,
                                      torch.device("cpu"), after_step=steps.append)
    assert steps == [1, 2, 3] and loss > 0 and 0.0 <= acc <= 100.0
    assert any(not torch.equal(before[n], p) for n, p in trained.items())
    sched.step()  # cosine over 4 epochs: lr/2 * (1 + cos(pi/4)) after the first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 + 0.7071067811865476))
    frozen = _tiny_model("ann")
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(train.RunError, match="nothing to train"):
        train.make_optimizer(train.RunConfig(method="ann"), frozen)


def test_checkpoint_round_trip_restores_the_state(tmp_path):
    cfg = train.RunConfig(epochs=3)
    run, info = RunDir(tmp_path), train.DistInfo()
    model = _tiny_model()
    state = train.TrainState(model, *train.make_optimizer(cfg, model))
    train.train_one_epoch(model, DataLoader(_data(16), batch_size=8), state.opt,
                          torch.device("cpu"))
    state.sched.step()
    state.history.append({"epoch": 1, "test_acc": 12.5})
    state.best, state.wall = 12.5, 1.5
    train.save_checkpoint(run, cfg, state, info)
    assert run.metrics.read_text().splitlines()[0].startswith("epoch,lr,")

    fresh = _tiny_model()
    restored = train.TrainState(fresh, *train.make_optimizer(cfg, fresh))
    ckpt = artifacts.load_torch_file(run.checkpoint, "checkpoint")
    torch.manual_seed(123)  # the checkpoint's RNG state replaces this
    train.restore_checkpoint(restored, ckpt, run.checkpoint, 0, torch.device("cpu"))
    assert (restored.start_epoch, restored.best, restored.wall) == (1, 12.5, 1.5)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert restored.sched.last_epoch == 1
    assert restored.opt.param_groups[0]["lr"] == state.opt.param_groups[0]["lr"]
    a = torch.rand(3)
    torch.set_rng_state(ckpt["rng"]["0"]["torch"])
    assert torch.equal(a, torch.rand(3))


def test_finish_writes_results_and_a_ticket_with_the_same_outputs(tmp_path):
    from binslt.training import data

    cfg = train.RunConfig(epochs=1)
    model = _tiny_model().eval()
    state = train.TrainState(model, *train.make_optimizer(cfg, model))
    state.history.append({"epoch": 1, "train_acc": 10.0, "test_acc": 20.0, "epoch_time_s": 0.5})
    state.best = 20.0
    bundle = data.load("digits")
    res = train.finish(RunDir(tmp_path), cfg, state, bundle, train.DistInfo(),
                       torch.device("cpu"), "torch", None)
    assert res["files"] == {"metrics": "metrics.csv", "checkpoint": "checkpoint.pt",
                            "ticket": "ticket.safetensors"}
    assert RunDir(tmp_path).read_results()["test_acc"] == 20.0
    x = torch.rand(5, 1, 8, 8)
    loaded = tickets.load_ticket(tmp_path / "ticket.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------
# Layering (the import ranks of the subpackages: tests/test_layout.py)
# ---------------------------------------------------------------------------------------------


def test_only_the_cli_parses_arguments_or_exits():
    for path in sorted((ROOT / "binslt").rglob("*.py")):
        if path.relative_to(ROOT / "binslt").parts[0] == "cli":
            continue
        text = path.read_text()
        assert "argparse" not in text and "SystemExit" not in text, path

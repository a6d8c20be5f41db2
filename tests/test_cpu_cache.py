"""The CPU kernels' block cache (``binslt.ops.cpu_cache_info``, ``set_cpu_cache_limit``,
``empty_cpu_cache``): a large output's freed memory serves the next allocation of its size, the
results are those of an independent computation whatever the block held before, the limit holds,
and bad limits are refused with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close_rel

import binslt
from binslt import BinSpikeConv2d, ops

pytestmark = pytest.mark.skipif(not binslt.backends()["cpu"]["usable"],
                                reason="the C++ CPU extension is not built")

BIG = 4 << 20  # csrc/include/binslt/big_tensor.h: kBigTensorBytes


@pytest.fixture(autouse=True)
def _default_limit():
    ops.set_cpu_cache_limit(None)
    yield
    ops.set_cpu_cache_limit(None)


def _unpacked(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, H, W, Cw] int32 words -> [B, channels, H, W] 0/1 floats, bit c % 32 of word c // 32
    (plain shifts, not binslt's code)."""
    bits = (packed.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    b, h, w, cw, _ = bits.shape
    return bits.reshape(b, h, w, cw * 32)[..., :channels].permute(0, 3, 1, 2).float()


def _words(shape, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = (torch.rand(*shape, 32, generator=g) < density).to(torch.int64)
    return (bits << torch.arange(32)).sum(-1).to(torch.int64).to(torch.int32)


def test_a_freed_output_serves_the_next_one_and_holds_no_stale_values():
    shape, channels = (64, 32, 32, 2), 64  # 64 * 64 * 32 * 32 floats = 16 MiB out
    ones = _words(shape, 1.0, 0)
    out = ops.unpack_spikes(ones, channels, backend="cpu")
    assert out.nbytes >= BIG and bool((out == 1).all())
    ptr = out.data_ptr()
    before = ops.cpu_cache_info()
    del out
    assert ops.cpu_cache_info()["held"] >= before["held"] + (16 << 20)
    sparse = _words(shape, 0.05, 1)
    again = ops.unpack_spikes(sparse, channels, backend="cpu")
    after = ops.cpu_cache_info()
    assert again.data_ptr() == ptr and after["hits"] == before["hits"] + 1
    assert torch.equal(again, _unpacked(sparse, channels))  # nothing of the ones is left


def test_limit_zero_turns_the_cache_off_and_frees_what_it_held():
    packed = _words((64, 32, 32, 2), 0.5, 2)
    out = ops.unpack_spikes(packed, 64, backend="cpu")
    del out
    assert ops.cpu_cache_info()["held"] > 0
    ops.set_cpu_cache_limit(0)
    assert ops.cpu_cache_info()["held"] == 0
    hits = ops.cpu_cache_info()["hits"]
    for _ in range(2):
        out = ops.unpack_spikes(packed, 64, backend="cpu")
        assert torch.equal(out, _unpacked(packed, 64))
        del out
    assert ops.cpu_cache_info() == {"held": 0, "limit": 0, "hits": hits,
                                    "misses": ops.cpu_cache_info()["misses"]}


def test_the_limit_bounds_the_held_bytes_and_empty_frees_them():
    ops.set_cpu_cache_limit(20)  # MiB: one 16 MiB block, not two
    packed = _words((64, 32, 32, 2), 0.5, 3)
    outs = [ops.unpack_spikes(packed, 64, backend="cpu") for _ in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3
    del outs
    info = ops.cpu_cache_info()
    assert info["limit"] == 20 << 20 and 0 < info["held"] <= 20 << 20
    ops.empty_cpu_cache()
    assert ops.cpu_cache_info()["held"] == 0 and ops.cpu_cache_info()["limit"] == 20 << 20


def test_training_steps_on_reused_blocks_match_the_reference():
    # T=4, N=4, 64 channels at 32x32: the spikes, dL/dZ and the input gradient are 4 MiB each
    torch.manual_seed(0)
    layer = BinSpikeConv2d(64, 64, 3, 1, 1, bn=True, decay=0.9, backend="cpu").train()
    x = (torch.rand(4, 4, 64, 32, 32) < 0.2).float().requires_grad_()
    g = torch.randn(4, 4, 64, 32, 32)

    def run(module):
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = module(x)
        out.backward(g)
        return out.detach().clone(), x.grad.clone(), module.scores.grad.clone()

    first = run(layer)
    hits = ops.cpu_cache_info()["hits"]
    second = run(layer)
    assert ops.cpu_cache_info()["hits"] > hits  # the second step ran on cached blocks
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = layer.__class__(64, 64, 3, 1, 1, bn=True, decay=0.9, backend="torch").train()
    ref.load_state_dict(layer.state_dict())
    want = run(ref)
    assert torch.equal(second[0], want[0])
    assert_close_rel(second[1], want[1], 1e-5)
    assert_close_rel(second[2], want[2], 1e-5)


def test_a_miss_frees_as_many_held_bytes_as_it_allocates():
    ops.empty_cpu_cache()
    packed = _words((64, 32, 32, 2), 0.5, 4)
    a, b = (ops.unpack_spikes(packed, 64, backend="cpu") for _ in range(2))  # 16 MiB each
    del a, b
    assert ops.cpu_cache_info()["held"] == 32 << 20
    small = ops.unpack_spikes(packed, 32, backend="cpu")  # 8 MiB: no block of its size
    assert ops.cpu_cache_info()["held"] == 16 << 20  # one 16 MiB block went back for it
    assert torch.equal(small, _unpacked(packed, 32))
    del small
    assert ops.cpu_cache_info()["held"] == 24 << 20


def _child_unpacks(queue):
    torch.set_num_threads(1)  # as a DataLoader worker: the parent's OpenMP team does not fork
    packed = _words((64, 32, 32, 2), 0.3, 5)
    hits = ops.cpu_cache_info()["hits"]
    out = ops.unpack_spikes(packed, 64, backend="cpu")  # a held block of the parent's size
    queue.put((bool(torch.equal(out, _unpacked(packed, 64))), ops.cpu_cache_info()["hits"] - hits))


def test_a_forked_child_uses_the_cache():
    import multiprocessing

    packed = _words((64, 32, 32, 2), 0.5, 6)
    out = ops.unpack_spikes(packed, 64, backend="cpu")
    del out  # the parent holds a 16 MiB block when it forks
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_unpacks, args=(queue,))
    child.start()
    ok, hits = queue.get(timeout=120)
    child.join(timeout=120)
    assert ok and hits == 1 and child.exitcode == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "64", True])
def test_a_bad_limit_is_refused(bad):
    with pytest.raises(ValueError, match="set_cpu_cache_limit"):
        ops.set_cpu_cache_limit(bad)


def test_a_bad_environment_limit_names_the_variable():
    code = ("import binslt.ops as o\n"
            "try:\n    o.cpu_cache_info()\nexcept ValueError as e:\n    print('ValueError:', e)")
    env = dict(os.environ, BINSLT_CPU_CACHE_MB="lots")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "ValueError" in res.stdout and "BINSLT_CPU_CACHE_MB" in res.stdout, res.stderr

"""Seed-gap probe (see docs/notes/search_seed_gap.md): one ``binslt.train.run`` with, at every epoch's evaluation,

(a) the test accuracy of a *copy* of the model after BN recalibration
    (``torch.optim.swa_utils.update_bn`` over the training split, in order, at the run's batch size),
(b) the fraction of mask entries that changed since the previous epoch (masked models).

The training trajectory is untouched (the copy is thrown away, and every epoch re-seeds its RNGs).

usage: python docs/notes/search_seed_probe.py METHOD SEED OUT [field=value ...]   (METHOD: binwslt|snn|bnn|ann)
"""

from __future__ import annotations

import copy
import json
import sys
import time

from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from binslt.ops import reference as ref
from binslt.training import data as data_mod
from binslt.training import loop as T


def main() -> None:
    method, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    defaults = T.RunConfig()
    over = {}
    for arg in sys.argv[4:]:
        k, v = arg.split("=", 1)
        cur = getattr(defaults, k)
        over[k] = float(v) if cur is None else type(cur)(v)
    mode = "train" if method in ("ann", "snn") else "search"
    cfg = T.RunConfig(method=method, seed=seed, mode=mode, **over)
    recal_loader = DataLoader(data_mod.load(cfg.dataset).train, batch_size=cfg.batch_size)
    plain_evaluate = T.evaluate
    rows: list[dict] = []
    prev: dict = {}

    def masks(m):
        return {n: ref.topk_mask(mod.scores, mod.prune_rate).clone()
                for n, mod in m.named_modules() if hasattr(mod, "scores")}

    def evaluate(model, loader, device, info):
        m2 = copy.deepcopy(model)
        update_bn(recal_loader, m2)
        _, recal = plain_evaluate(m2, loader, device, info)
        cur = masks(model)
        n = sum(v.numel() for v in cur.values())
        changed = (sum((cur[k] != prev[k]).sum().item() for k in cur) / n) if prev and n else None
        prev.clear()
        prev.update(cur)
        loss, acc = plain_evaluate(model, loader, device, info)
        rows.append({"acc": acc, "recal": recal, "mask_change": changed})
        return loss, acc

    T.evaluate = evaluate
    t = time.time()
    r = T.run(cfg, out, overwrite=True, progress=False, log=lambda s: None)
    for i, row in enumerate(rows):
        ch = "nan" if row["mask_change"] is None else f"{row['mask_change']:.5f}"
        print(f"ep {i + 1:2d} acc {row['acc']:6.2f} recal {row['recal']:6.2f} maskchg {ch}")
    print(json.dumps({"method": method, "seed": seed, "cfg": over, "test_acc": r["test_acc"],
                      "best": r["best_test_acc"], "recal_final": rows[-1]["recal"],
                      "recal_best": max(x["recal"] for x in rows), "wall": time.time() - t}))


if __name__ == "__main__":
    main()

"""Recipe v2 probe: train variants of a family at small sizes, print validation bpb."""
import dataclasses, json, sys, time
from pathlib import Path
import torch
from mcl_utils import zoo

variant, family_name, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
torch.set_num_threads(1)
base = zoo.FAMILIES[family_name]
mods = json.loads(variant)
lr_scale = mods.pop("lr_scale", 1.0)
fam = dataclasses.replace(base, **mods)
out = Path("/tmp/v2/cards") / (family_name + "-" + "-".join(f"{k}{v}" for k, v in sorted(json.loads(variant).items())))
out.mkdir(parents=True, exist_ok=True)
for spec in names:
    size, seed = (spec.split("-") + ["s0"])[:2]
    model = zoo.ZooModel(fam, size, int(seed[1:]))
    lr = zoo.peak_lr(base, model.size.width) * lr_scale
    rec = zoo.recipe(model, lr)
    run_dir = zoo.checkpoint_dir(model, rec)
    t = time.time()
    card = zoo._train_locked(model, rec, run_dir, torch.device("cpu"), out, 10**9, False, None, True, lambda s: None)
    print(f"{out.name} {spec} steps={rec['steps']} rows={rec['batch_rows']} lr={lr:.4f} val_bpb={card['val_bpb']:.4f} "
          f"train_loss={card['final_train_loss_nats']:.3f} wall={time.time()-t:.0f}s", flush=True)

r"""lemniscate.pytorch's own InstDisc on mim_jax's CIFAR-10 budget: the reference run beside
`configs/instdisc.py:cifar10`.

  git clone https://github.com/zhirongw/lemniscate.pytorch /tmp/lemniscate.pytorch
  python tools/reference_instdisc.py --lemniscate /tmp/lemniscate.pytorch \
    --data ../shared/data/cifar10/train --out runs/reference_instdisc.json

Needs PyTorch (CPU is enough; not a mim_jax dependency). Trains the official modules, not a
re-implementation: lib/NCEAverage.py (memory bank, noise draws, Z fixed at the first batch),
lib/NCECriterion.py and models/resnet_cifar.py (its ResNet-18, convolutions at nn.Conv2d's own
init), copied to a temporary folder and patched only where the 2018 code no longer runs: the
`.cuda()` of the noise sampler (CPU here), the backward's `.data.resize_` reshapes (modern
PyTorch no longer reshapes a tensor through `.data`; the same arithmetic written with
`reshape`), and the channel widths (x `--width`, 0.25 as the preset). cifar.py's loop at the
preset's budget: batch 256, SGD lr 0.03 x 256 / 128, momentum 0.9, weight decay 5e-4, lr x 0.1
at 60% and 80% of the steps, K = 4096, T = 0.1, m = 0.5, over the preset's 45,000 training
images. The augmented batches are mim_jax's own (the preset's views, cut on the host the way
its in-memory data is), so the two runs differ only in the code under test. Then mim_jax's
kNN protocol (knn: k 20, T 0.07; knn_200: k 200, T 0.1; the 20,000-image bank, the 5,000
held-out queries) on the pooled backbone features, at initialisation and at the end.
Prints a JSON line per 20 steps and writes them with the kNN results to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, old text, new text): the only edits to the official code (see the docstring).
PATCHES = (
    ("lib/NCEAverage.py", "        self.multinomial.cuda()\n", "        pass  # CPU\n"),
    ("lib/NCEAverage.py",
     "        gradOutput.data.mul_(out.data)\n"
     "        # add temperature\n"
     "        gradOutput.data.div_(T)\n"
     "\n"
     "        gradOutput.data.resize_(batchSize, 1, K+1)\n"
     "        \n"
     "        # gradient of linear\n"
     "        gradInput = torch.bmm(gradOutput.data, weight)\n"
     "        gradInput.resize_as_(x)\n",
     "        g = (gradOutput * out / T).reshape(batchSize, 1, K+1)\n"
     "        gradInput = torch.bmm(g, weight).reshape_as(x)\n"),
    ("lib/NCEAverage.py", "weight_pos = weight.select(1, 0).resize_as_(x)",
     "weight_pos = weight.select(1, 0).clone()"),
)


def official_modules(checkout: str, width: float):
  """(ResNet18, NCEAverage, NCECriterion) imported from a patched copy of `checkout`."""
  work = tempfile.mkdtemp(prefix="lemniscate_")
  for sub in ("lib", "models"):
    shutil.copytree(os.path.join(checkout, sub), os.path.join(work, sub))
  for rel, old, new in PATCHES:
    path = os.path.join(work, rel)
    text = open(path).read()
    if old not in text:
      raise SystemExit(f"{rel} of {checkout} is not the code this tool patches (expected "
                       f"{old.strip()[:40]!r}): check out lemniscate.pytorch's master")
    open(path, "w").write(text.replace(old, new))
  path = os.path.join(work, "models/resnet_cifar.py")
  text = open(path).read()
  scale = lambda m: f"{m.group(1)}{int(int(m.group(2)) * width)}"  # noqa: E731  (one pass)
  text = re.sub(r"(self\._make_layer\(block, )(\d+)", scale, text)
  text = re.sub(r"(nn\.Linear\()(\d+)(?=\*block\.expansion)", scale, text)
  c0 = int(64 * width)
  text = (text.replace("self.in_planes = 64", f"self.in_planes = {c0}")
          .replace("nn.Conv2d(3, 64,", f"nn.Conv2d(3, {c0},")
          .replace("nn.BatchNorm2d(64)", f"nn.BatchNorm2d({c0})"))
  open(path, "w").write(text)
  sys.path.insert(0, work)
  from lib.NCEAverage import NCEAverage  # pylint: disable=g-import-not-at-top
  from lib.NCECriterion import NCECriterion  # pylint: disable=g-import-not-at-top
  from models.resnet_cifar import ResNet18  # pylint: disable=g-import-not-at-top
  return ResNet18, NCEAverage, NCECriterion


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lemniscate", required=True, help="a checkout of zhirongw/lemniscate.pytorch")
  ap.add_argument("--data", required=True, help="the CIFAR-10 image folder")
  ap.add_argument("--steps", type=int, default=875)
  ap.add_argument("--width", type=float, default=0.25)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--out", default="runs/reference_instdisc.json")
  args = ap.parse_args(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("this tool runs lemniscate.pytorch's code: pip install torch (CPU is enough)")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from mim_jax import config_lib, methods  # pylint: disable=g-import-not-at-top
  from mim_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  from mim_jax.evaluators import common, knn  # pylint: disable=g-import-not-at-top

  ResNet18, NCEAverage, NCECriterion = official_modules(args.lemniscate, args.width)
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  c = config_lib.load("instdisc", "cifar10", os.path.join(ROOT, "configs"))
  c.input.data.dir = args.data
  method = methods.get(c)
  images = np.asarray(sources.load_in_memory(c.input.data, "pretrain").images)
  n = len(images)
  net = ResNet18(int(c.instdisc.low_dim))

  def pooled(x):   # the network up to its average pool (what mim_jax's kNN reads)
    out = torch.relu(net.bn1(net.conv1(x)))
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
      out = layer(out)
    return out.mean((2, 3))

  def to_torch(x):
    return torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2).contiguous()

  def knn_eval():
    net.eval()
    feats = {}
    with torch.no_grad():
      for split, limit in (("train", int(c.evals.knn.max_train)), ("eval", None)):
        fs, ls = [], []
        for imgs, labels in pipeline.eval_batches(c.input, split, 500, limit):
          fs.append(pooled(to_torch(method.eval_preprocess(jnp.asarray(imgs), c.input))).numpy())
          ls.append(labels)
        feats[split] = (np.concatenate(fs), np.concatenate(ls))
    net.train()
    (bank, bank_labels), (queries, labels) = feats["train"], feats["eval"]
    out = {}
    for name in ("knn", "knn_200"):
      e = c.evals[name]
      scores = knn.knn_scores(bank, bank_labels, queries, 10, k=int(e.k),
                              temperature=float(e.temperature))
      out[f"{name}/top1"] = round(float(common.topk_accuracy(scores, labels, ks=(1,))[1]), 2)
    return out

  batch, per_epoch = int(c.input.batch_size), n // int(c.input.batch_size)
  results = {"protocol": {"steps": args.steps, "width": args.width, "batch": batch,
                          "checkout": os.path.abspath(args.lemniscate)},
             "init": knn_eval()}
  print(json.dumps({"init": results["init"]}), flush=True)
  lem = NCEAverage(int(c.instdisc.low_dim), n, int(c.instdisc.nce_k), float(c.instdisc.nce_t),
                   float(c.instdisc.nce_m))
  criterion = NCECriterion(n)
  # The preset's optimiser: lr base x batch / divisor, its momentum and weight decay, its lr
  # drops at the same fractions of the run.
  base_lr = float(c.optim.base_lr) * batch / float(c.optim.lr_batch_divisor)
  opt = torch.optim.SGD(net.parameters(), lr=base_lr, momentum=float(c.optim.momentum),
                        weight_decay=float(c.optim.weight_decay))
  drops = tuple(int(m / float(c.total_epochs) * args.steps) for m in c.optim.milestones_epochs)
  views = jax.jit(lambda r, x: method.preprocess(r, x, c.input, True))
  losses, log, t0 = [], [], time.time()
  for s in range(args.steps):
    for g in opt.param_groups:
      g["lr"] = base_lr * 0.1 ** sum(s >= d for d in drops)
    epoch, j = divmod(s, per_epoch)
    idx = np.random.default_rng(epoch).permutation(n)[j * batch:(j + 1) * batch]
    v = views(jax.random.PRNGKey(s), jnp.asarray(images[idx]))
    x = to_torch(v["global"][:, 0] if isinstance(v, dict) else v)
    y = torch.from_numpy(idx.astype(np.int64))
    loss = criterion(lem(net(x), y), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if (s + 1) % 20 == 0 or s + 1 == args.steps:
      rec = {"step": s + 1, "loss": round(float(np.mean(losses[-20:])), 4),
             "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0)}
      log.append(rec)
      print(json.dumps(rec), flush=True)
  results["trained"] = knn_eval()
  results["log"] = log
  print(json.dumps({"trained": results["trained"]}), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Where an epoch of neural training goes, beside a plain MLP's epoch on the same rows.

Issue "Neural fits near the hardware floor": binomial ``y ~ nn(x1, x2, hidden=(64, 64)) + x3
+ (1 | g)`` (simulated by :func:`ngmm_formula.datasets.simulate_grouped`, sine effect), one
thread. The NGMM trains for a fixed number of epochs (early stopping off: ``min_steps`` above
the run) while timers wrap the stages the training loop composes:

* ``assembly``: :meth:`Problem.subset` (a minibatch's rows, blocks and inputs) and the draws
  of the input noise;
* ``network fwd``: the networks' forward pass (:meth:`MLP.raw`) on the minibatch;
* ``integral fwd``: the rest of :meth:`Objective.per_block` with gradients on (conditional
  modes, the Laplace / quadrature sum per group);
* ``backward``: ``loss.backward()`` (network and integral together; the plain MLP's
  backward of the same network on a minibatch of the same size is the network's share);
* ``optimiser``: ``AdamW.step`` (:mod:`ngmm_formula.adamw`);
* ``validation``: the forward pass on the validation groups (gradients off);
* ``other``: the rest of the epoch loop (bookkeeping, best-state copies).

Every figure of the NGMM is per *pass* over its training groups, as the MLP's epoch is a
pass over the rows: with ``Control.steps_per_epoch`` (default 50 minibatches) a pass of more
minibatches is several of the trainer's epochs, each with its validation score, and the
table counts all of them (at 10^6 rows: 4.4 validations a pass).

With ``--noise-inputs K`` the network also sees K standard normal columns ``z0, ...`` that
do not enter the truth (the case of many numeric inputs, e.g. for the additive part's cost;
the plain MLP gets them too).

The plain MLP is the architecture of the issue (inputs x1, x2, x3 standardised; two hidden
layers of 64, ReLU), float32 like the NGMM's networks, ``BCEWithLogitsLoss``, Adam,
minibatches of the NGMM's ``batch_size`` rows, on the same rows, in the same process. Since
``nn()`` has an additive part by default (``additive=32``: a sum of hinge functions of each
input beside the joint network), which that MLP lacks, the table also trains *the same
network without random effects*: a copy of the fitted NGMM's network module (body, linear
path and additive part, as ``nn()`` built it) with an intercept and x3, the same loss,
optimiser and minibatches ("same network"). With ``--nn "additive=0"`` the two networks
are the same architecture. The two baselines run interleaved with the NGMM's training: one
epoch of each before every pass of the NGMM over its training groups (outside its timers,
and subtracted from its loop), so that a drift of the machine's speed during the run
reaches both sides of each ratio alike (between separate processes of one run the plain
MLP's epoch was seen to vary by up to 30 %). Each size runs in a fresh
subprocess pinned to one thread. Beside the wall-clock seconds the table gives the process's
CPU seconds per epoch of both loops (``time.process_time``; with one thread it is the
wall-clock time of an idle machine, and far less sensitive to other jobs on a shared one) and
their ratio. Prints a table::

    python benchmarks/neural_epoch.py                       # 10^5 and 10^6 rows
    python benchmarks/neural_epoch.py --rows 100000 --epochs 10
    python benchmarks/neural_epoch.py --approx laplace   # the same fit with one node
    python benchmarks/neural_epoch.py --control "" train_approx=laplace   # A/B, same run
    python benchmarks/neural_epoch.py --nn "" additive=0   # nn() options: A/B, same run

``--control`` and ``--nn`` combine: one run per size, Control setting and nn() options.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import copy, json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
import torch
torch.set_num_threads(1)
from ngmm_formula import Control, ngmm
from ngmm_formula import adamw, fit as fit_module, model, networks, train
from ngmm_formula.datasets import simulate_grouped

rows, groups, epochs, seed = map(int, sys.argv[1:5])
approx = sys.argv[5]
nn_options = sys.argv[7]  # appended inside nn(), e.g. "additive=0"
noise_inputs = [f"z{k}" for k in range(int(sys.argv[8]))]  # inputs outside the truth
settings = {}  # Control fields of this run, "name=value,name=value"
for item in filter(None, sys.argv[6].split(",")):
    name, value = item.split("=")
    settings[name] = int(value) if value.lstrip("-").isdigit() else value
# the plain MLP's torch.optim.Adam imports torch._dynamo on construction (about 1 s, once; the
# NGMM's own AdamW does not): a fixed cost of the process, paid here before anything is timed
torch.optim.Adam([torch.zeros(1, requires_grad=True)])
df = simulate_grouped(n_groups=groups, n_per_group=rows // groups, family="binomial",
                      effect="sine", seed=seed)
parts = {k: 0.0 for k in ("assembly", "network fwd", "per_block", "backward", "optimiser",
                          "validation", "linear start", "train", "baselines")}
cpu = {"linear start": 0.0, "train": 0.0, "baselines": 0.0}  # process CPU time (one thread)

def timed(name, fn, when=lambda: True):
    def wrapper(*args, **kwargs):
        if not when():
            return fn(*args, **kwargs)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] += time.perf_counter() - t
    return wrapper

inside = [False]  # only time the stages while train_member runs (not the GLMM start/refit)
def training():
    return inside[0]
def grad_on():
    return inside[0] and torch.is_grad_enabled()
def grad_off():
    return inside[0] and not torch.is_grad_enabled()

model.Problem.subset = timed("assembly", model.Problem.subset, training)
networks.MLP.raw = timed("network fwd", networks.MLP.raw, grad_on)
per_block = fit_module.Objective.per_block
fit_module.Objective.per_block = timed("per_block", timed("validation", per_block, grad_off),
                                       grad_on)
torch.Tensor.backward = timed("backward", torch.Tensor.backward, training)
adamw.AdamW.step = timed("optimiser", adamw.AdamW.step, training)
def stage(name, fn, inside_value):  # time fn (wall, CPU) as name; epoch timers on/off in it
    def wrapper(*args, **kwargs):
        outer, inside[0] = inside[0], inside_value
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] += time.perf_counter() - t
            cpu[name] += time.process_time() - c
            inside[0] = outer
    return wrapper

# the linear start's evaluations are not the epoch's
train._fit_linear_part = stage("linear start", train._fit_linear_part, False)
train.train_member = stage("train", train.train_member, True)

# the baselines, on the same rows, interleaved with the NGMM's training: one epoch of each
# before every pass of the NGMM over its training groups (paired against the machine's
# drift), outside the NGMM's timers and subtracted from its loop
control = Control(progress=False, epochs=epochs, min_steps=10**9, refit=False, **settings)
batch = control.batch_size  # the NGMM's minibatch rows
columns = ["x1", "x2", *noise_inputs, "x3"]
for k, name in enumerate(noise_inputs):
    df[name] = np.random.default_rng([seed, k]).standard_normal(len(df))
x = torch.as_tensor(df[columns].to_numpy(), dtype=torch.float32)
x = (x - x.mean(0)) / x.std(0)
y = torch.as_tensor(df.y.to_numpy(), dtype=torch.float32)
torch.manual_seed(seed)
# the plain MLP of the issue
mlp = torch.nn.Sequential(torch.nn.Linear(len(columns), 64), torch.nn.ReLU(),
                          torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
lossf = torch.nn.BCEWithLogitsLoss()
def mlp_epoch():
    order = torch.randperm(rows)
    fwd = bwd = st = 0.0
    for s in range(0, rows, batch):
        idx = order[s:s + batch]
        t = time.perf_counter()
        loss = lossf(mlp(x[idx]).squeeze(-1), y[idx])
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        fwd += t1 - t; bwd += t2 - t1; st += t3 - t2
    return fwd, bwd, st
# the same network without random effects: a copy of the NGMM's own network module (its
# body, linear path and additive part, as nn() built it) plus the intercept and x3
same = {}
def same_epoch():
    net, head, opt_same, net_x, x3 = (same[k] for k in ("net", "head", "opt", "x", "x3"))
    order = torch.randperm(rows)
    for s in range(0, rows, batch):
        idx = order[s:s + batch]
        out = net.raw(net_x[idx]).to(torch.float32) + head(x3[idx]).squeeze(-1)
        loss = lossf(out, y[idx])
        opt_same.zero_grad(set_to_none=True)
        loss.backward()
        opt_same.step()
base = {"mlp": [], "same": [], "mlp_parts": []}
def timed_epoch(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t, time.process_time() - c), out
def baselines(module):
    if not same:  # built from the NGMM's module at its first pass, warmed up once each
        net = copy.deepcopy(module.nets[0]).train()
        net.requires_grad_(True)
        head = torch.nn.Linear(1, 1)
        same.update(net=net, head=head, x=x[:, :len(columns) - 1].to(net.linear.weight.dtype),
                    x3=x[:, -1:], opt=torch.optim.Adam([*net.parameters(),
                                                        *head.parameters()], lr=1e-3))
        mlp_epoch(); same_epoch()
    times, parts_mlp = timed_epoch(mlp_epoch)
    base["mlp"].append(times); base["mlp_parts"].append(parts_mlp)
    base["same"].append(timed_epoch(same_epoch)[0])
baselines = stage("baselines", baselines, False)
current = {}
loop_fn = train._train_with_early_stopping
def loop_capturing_module(module, *args, **kwargs):
    current["module"] = module
    return loop_fn(module, *args, **kwargs)
train._train_with_early_stopping = loop_capturing_module
next_epoch = train._Epochs.next
def next_with_baselines(self):
    if not self._pending:  # a pass of the NGMM begins
        baselines(current["module"])
    return next_epoch(self)
train._Epochs.next = next_with_baselines

inputs = ", ".join(filter(None, ["x1, x2", *noise_inputs, "hidden=(64, 64)", nn_options]))
fit = ngmm(f"y ~ nn({inputs}) + x3 + (1 | g)", df, "binomial",
           approx=approx, control=control, seed=seed)
n_epochs = len(fit.history.train)
loop = parts["train"] - parts["linear start"] - parts["baselines"]
# Problem.subset runs before Objective.per_block; the integral is per_block minus the network
ngmm = {
    "assembly": parts["assembly"],
    "network fwd": parts["network fwd"],
    "integral fwd": parts["per_block"] - parts["network fwd"],
    "backward": parts["backward"],
    "optimiser": parts["optimiser"],
    "validation": parts["validation"],
}
ngmm["other"] = loop - sum(ngmm.values())
# per pass over the training groups: with Control.steps_per_epoch an epoch can be part of
# a pass, its validation scores and bookkeeping then come several times a pass (all counted)
passes = fit.history.passes
ngmm = {k: v / passes for k, v in ngmm.items()}

mlp_total, mlp_cpu = np.mean(base["mlp"], axis=0)
same_total, same_cpu = np.mean(base["same"], axis=0)
sums = np.mean(base["mlp_parts"], axis=0)
print(json.dumps({"rows": rows, "groups": groups, "epochs": n_epochs, "passes": passes,
                  "setting": ",".join(filter(None, [approx if approx != "auto" else "",
                                                    sys.argv[6],
                                                    nn_options and f"nn({nn_options})",
                                                    noise_inputs
                                                    and f"{len(noise_inputs)} noise inputs"]))
                             or "default",
                  "ngmm": ngmm, "ngmm_epoch": loop / passes,
                  "mlp_epoch": mlp_total, "mlp_cpu": mlp_cpu,
                  "same_epoch": same_total, "same_cpu": same_cpu,
                  "ngmm_cpu": (cpu["train"] - cpu["linear start"] - cpu["baselines"]) / passes,
                  "baseline_epochs": len(base["mlp"]),
                  "mlp_fwd": sums[0], "mlp_bwd": sums[1],
                  "mlp_step": sums[2], "threads": torch.get_num_threads()}))
"""


def run(rows: int, groups: int, epochs: int, seed: int, approx: str = "auto",
        control: str = "", nn: str = "", noise_inputs: int = 0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(rows), str(groups), str(epochs),
                          str(seed), approx, control, nn, str(noise_inputs)], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    stages = list(results[0]["ngmm"])
    head = ("| rows | groups | setting | epochs (passes) | " + " | ".join(stages)
            + " | NGMM pass s | MLP epoch s | MLP fwd / bwd / step | ratio | CPU s NGMM / MLP "
            "| CPU ratio | CPU s same network | CPU ratio to it |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = " | ".join(f"{r['ngmm'][s]:.3f}" for s in stages)
        lines.append(
            f"| {r['rows']:,} | {r['groups']:,} | {r['setting']} | {r['epochs']} "
            f"({r['passes']:.1f}) | {cells} | "
            f"{r['ngmm_epoch']:.3f} | {r['mlp_epoch']:.3f} | {r['mlp_fwd']:.3f} / "
            f"{r['mlp_bwd']:.3f} / {r['mlp_step']:.3f} | "
            f"{r['ngmm_epoch'] / r['mlp_epoch']:.2f} | {r['ngmm_cpu']:.3f} / "
            f"{r['mlp_cpu']:.3f} | {r['ngmm_cpu'] / r['mlp_cpu']:.2f} | {r['same_cpu']:.3f} "
            f"| {r['ngmm_cpu'] / r['same_cpu']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--per-group", type=int, nargs="+", default=[100, 20],
                    help="rows per group for each size (the issue: 1,000 groups at 10^5 "
                         "rows, 50,000 at 10^6)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--approx", default="auto",
                    help="approx= of the fit (e.g. laplace: what training on one node costs)")
    ap.add_argument("--control", nargs="+", default=[""],
                    help="Control settings to compare, one run each per size, e.g. '' "
                         "train_approx=laplace ('' = the default)")
    ap.add_argument("--nn", nargs="+", default=[""],
                    help="options appended inside nn() to compare, one run each per size and "
                         "Control setting, e.g. '' additive=0 ('' = the default; several "
                         "options in one string: 'additive=0, dropout=0.1')")
    ap.add_argument("--noise-inputs", type=int, default=0,
                    help="standard normal columns outside the truth, added to the inputs of "
                         "nn() and of the plain MLP")
    args = ap.parse_args()
    per_group = args.per_group + [args.per_group[-1]] * (len(args.rows) - len(args.per_group))
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f}; seconds per epoch, "
          "one thread")
    print(f"approx={args.approx!r}")
    results = [run(n, n // k, args.epochs, args.seed, args.approx, c, o, args.noise_inputs)
               for n, k in zip(args.rows, per_group) for c in args.control for o in args.nn]
    print(table(results))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Spies for tests/test_wiring.py: what a method's main() handed to the functions, optimisers and run it
calls, bound by name to the real signature (an argument main() leaves out shows as the callee's default)."""
import inspect
import json
import os
import re


def spy(monkeypatch, owner, name, copy=(), flat=False):
    """Replace owner.name by a wrapper that records every call: {"args": the arguments by parameter name,
    defaults filled in, "result": what it returned}; for the tensor arguments named in `copy`, also their
    values "before" and "after" the call (the callee may change them in place, e.g. a memory bank); "result" in
    `copy` keeps a copy of a returned tensor as "result_copy" (a tensor that is changed in place later).
    flat: each call as {parameter: argument, ..., "returned": what it returned} (tests/test_wiring_eval.py)."""
    real = getattr(owner, name)
    sig = inspect.signature(real)
    calls = []

    def wrapper(*a, **k):
        bound = sig.bind(*a, **k)
        bound.apply_defaults()
        if flat:
            calls.append({**bound.arguments, "returned": real(*a, **k)})
            return calls[-1]["returned"]
        rec = {"args": dict(bound.arguments)}
        names = [c for c in copy if c != "result"]
        rec["before"] = {c: rec["args"][c].detach().clone() for c in names}
        rec["result"] = real(*a, **k)
        rec["after"] = {c: rec["args"][c].detach().clone() for c in names}
        if "result" in copy:
            rec["result_copy"] = rec["result"].detach().clone()
        calls.append(rec)
        return rec["result"]

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def spies(monkeypatch, owner, *names):
    """spy() on each of owner's names, in that order."""
    return [spy(monkeypatch, owner, name) for name in names]


def spy_optimizer(monkeypatch, owner, name):
    """Replace the optimiser class owner.name by a subclass that records itself, and at every step() the
    hyper-parameters of each of its param groups as step() reads them (lr as set by the schedule)."""
    real = getattr(owner, name)
    made = []

    class Recording(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.groups_at_step = []
            made.append(self)

        def step(self, closure=None):
            self.groups_at_step.append([{k: v for k, v in g.items() if k != "params"} for g in self.param_groups])
            return super().step(closure)

    Recording.__name__ = Recording.__qualname__ = real.__name__
    monkeypatch.setattr(owner, name, Recording)
    return made


def argv(flags, defaults):
    """Command line of a {dest: value} dict: a bool at its default is left out, True -> --flag, False ->
    --no-flag; a list -> --flag v1 v2."""
    out = []
    for dest, v in flags.items():
        flag = "--" + dest.replace("_", "-")
        if isinstance(v, bool):
            out += [] if v == defaults[dest] else [flag if v else "--no-" + flag[2:]]
        elif isinstance(v, (list, tuple)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def numbers(flags):
    """Every number a recipe dict sets: numeric values, the elements of lists, the widths in a '24-10' spec."""
    out = []
    for v in flags.values():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += list(v)
        elif isinstance(v, str) and re.fullmatch(r"\d+(-\d+)*", v):
            out += [int(d) for d in v.split("-")]
    return out


def metrics(out):
    """The logged steps of a run folder's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def aug_dict(cfg):
    """An AugConfig (or its vars() as saved in a checkpoint) as plain lists and floats, to compare."""
    d = cfg if isinstance(cfg, dict) else vars(cfg)
    return {k: [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v) for k, v in d.items()}


def params_of(model):
    return {id(p) for p in model.parameters()}


def optimised(optimizer):
    return [id(p) for g in optimizer.param_groups for p in g["params"]]



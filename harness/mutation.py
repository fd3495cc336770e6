"""Mutation scores per module from mutmut's own records, on all mutants or a seeded sample.

mutmut 3 (pip install mutmut; configured in pyproject.toml) writes mutants/<module>.meta: each
mutant's exit code and each function's source hash. A module has hundreds to thousands of
mutants and the slow ones take minutes each, so a whole module can take hours on 2 cores; a
uniform random sample of a few hundred gives its score within a few points, and says so.

    python -m harness.mutation sample tasks.py 200    # the sample's mutants that have not run yet,
    mutmut run $(python -m harness.mutation sample tasks.py 200)     # ... and running them
    python -m harness.mutation score tasks.py:200 ae.py mnist.py     # killed / run per module
    python -m harness.mutation compare BEFORE/mutants tasks.py:200    # the same mutations, two trees

A module's sample of N: the first N of random.Random(SEED).sample(sorted names, min(POOL, all)),
so a smaller N is a prefix of a larger one and both trees draw alike; N >= all: every mutant.
Killed: a test failed, or the tests ran past mutmut's time limit (the mutant made them hang).
compare pairs a mutant with the same mutation in another tree: the same function name, the same
source hash, the same mutant number. A pair killed there and alive here is a test that was lost.

First read: skip this file; it is a development tool, never needed to run or test the bake-off.
"""

import argparse
import collections
import json
import math
import os
import random
import re
import sys

SEED = 0
POOL = 200               # the largest sample drawn; smaller ones are its prefixes
KILLED = {1, -24}        # mutmut's exit codes: a test failed / the tests timed out
SURVIVED, NOT_RUN = 0, None


def read_meta(mutants_dir, module):
    """({mutant name: exit code}, {function name: source hash}) of one module."""
    path = os.path.join(mutants_dir, module + ".meta")
    if not os.path.exists(path):
        raise SystemExit(f"no {path}: run `mutmut run` in the tree above {mutants_dir} first")
    with open(path) as f:
        meta = json.load(f)
    return meta["exit_code_by_key"], meta["hash_by_function_name"]


def sample(names, n):
    """The module's sample of n mutant names (every name if n covers them all), sorted."""
    names = sorted(names)
    if n >= len(names):
        return names
    if n > POOL:
        raise SystemExit(f"a sample of {n} is more than the {POOL} drawn; take all (0) or at most {POOL}")
    return sorted(random.Random(SEED).sample(names, min(POOL, len(names)))[:n])


def score(codes, names):
    """{"run", "killed", "survived", "other"} over the named mutants; other: no tests, segfaults..."""
    seen = collections.Counter(codes[k] for k in names)
    killed = sum(seen[c] for c in KILLED)
    run = len(names) - seen[NOT_RUN]
    return {"run": run, "killed": killed, "survived": seen[SURVIVED], "other": run - killed - seen[SURVIVED]}


def interval(killed, run, total):
    """Half-width of the 95% interval of killed / run for a sample of `run` out of `total`:
    1.96 sqrt(p (1 - p) / run), with the finite-population factor sqrt(1 - run / total)."""
    if run == 0:
        return float("nan")
    p = killed / run
    return 1.96 * math.sqrt(p * (1 - p) / run * max(0.0, 1 - run / total))


def index(mutants_dir):
    """{(function name, source hash): {mutant number: exit code}} over every module of a tree,
    so that a function moved to another module still finds its twin."""
    out = collections.defaultdict(dict)
    for folder, _, files in os.walk(mutants_dir):
        for file in files:
            if file.endswith(".py.meta"):
                module = os.path.relpath(os.path.join(folder, file), mutants_dir)[:-len(".meta")]
                codes, hashes = read_meta(mutants_dir, module)
                for name, code in codes.items():
                    function, number = _split(name)
                    if function in hashes:
                        out[function, hashes[function]][number] = code
    return out


def pairs(codes, hashes, names, twins):
    """{(killed there, killed here): count} over the named mutants that ran here and whose twin
    (same function, same source, same mutant number) ran in the other tree's index `twins`."""
    out = collections.Counter()
    for name in names:
        function, number = _split(name)
        there = twins.get((function, hashes.get(function)), {}).get(number, NOT_RUN)
        if codes[name] is not NOT_RUN and there is not NOT_RUN:
            out[there in KILLED, codes[name] in KILLED] += 1
    return out


def _split(name):
    """'tasks.x_roc_auc__mutmut_7' -> ('x_roc_auc', 7)"""
    function, number = re.fullmatch(r"(.+)__mutmut_(\d+)", name).groups()
    return function.rsplit(".", 1)[-1], int(number)


def _module_and_n(arg):
    module, _, n = arg.partition(":")
    return module, int(n) if n else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mutants", default="mutants", help="mutmut's folder (default: ./mutants)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="the sample's mutant names that have not run yet")
    s.add_argument("module"), s.add_argument("n", type=int)
    c = sub.add_parser("score", help="killed / run per module; MODULE:N for a sample of N")
    c.add_argument("modules", nargs="+")
    m = sub.add_parser("compare", help="pairs with the same mutations in another tree's mutants folder")
    m.add_argument("other"), m.add_argument("modules", nargs="+")
    args = p.parse_args(argv)
    if args.command == "sample":
        codes, _ = read_meta(args.mutants, args.module)
        print("\n".join(k for k in sample(codes, args.n) if codes[k] is NOT_RUN))
        return
    twins = index(args.other) if args.command == "compare" else None
    for module, n in map(_module_and_n, args.modules):
        codes, hashes = read_meta(args.mutants, module)
        names = sample(codes, n or len(codes))
        if args.command == "score":
            r = score(codes, names)
            share = f"{100 * r['killed'] / r['run']:.1f}% ± {100 * interval(r['killed'], r['run'], len(codes)):.1f}" if r["run"] else "none run"
            print(f"{module}: {len(codes)} mutants, {len(names)} sampled, {r['run']} run: "
                  f"{r['killed']} killed, {r['survived']} survived, {r['other']} other; {share}")
        else:
            seen = pairs(codes, hashes, names, twins)
            print(f"{module}: {sum(seen.values())} pairs; killed in both {seen[True, True]}, in neither "
                  f"{seen[False, False]}, only there {seen[True, False]}, only here {seen[False, True]}")


if __name__ == "__main__":
    sys.exit(main())

"""Mutation pass: one-line mutants of the named code, each run against the default-suite tests that
cover its file; a mutant the tests do not fail survives. The score is killed / (killed + survived).

Mutants (one per line and token): an arithmetic or comparison operator swapped (+ -, * /, < <=, ...),
and / or, True / False, min / max, a number changed (n -> n + 1, x -> 2x, 0 -> 1), a unary minus
dropped, two neighbouring positional arguments of a call swapped, one keyword argument of a call dropped.
Named code: common.py above the harness fence, the four method files, eval_linear.py.

    python bench/mutate.py --list                         # mutants per file
    python bench/mutate.py --sample 200 --seed 0          # a seeded sample, two at a time
    python bench/mutate.py --only emp_ssl.py --out m.jsonl
The source is restored after each mutant (and on Ctrl-C). Each mutant runs in its own copy of the
repository, so two run side by side without touching the working tree.
"""
import argparse
import ast
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = "# ======== harness"
TESTS = {  # the default-suite tests that speak for each file
    "common.py": ["tests/test_common.py", "tests/test_wiring.py", "tests/test_backbones.py"],
    "emp_ssl.py": ["tests/test_wiring.py", "tests/test_emp_ssl.py"],
    "bag_ssl.py": ["tests/test_wiring.py", "tests/test_bag_ssl.py"],
    "multiaug_ssl.py": ["tests/test_wiring.py", "tests/test_multiaug_ssl.py"],
    "npid_sqrtkl.py": ["tests/test_wiring.py", "tests/test_npid_sqrtkl.py"],
    "eval_linear.py": ["tests/test_wiring_eval.py", "tests/test_cli.py"],
}
SWAP = {"+": "-", "-": "+", "*": "/", "/": "*", "//": "*", "**": "*", "<": "<=", "<=": "<", ">": ">=", ">=": ">",
        "==": "!=", "!=": "==", "and": "or", "or": "and", "True": "False", "False": "True", "min": "max", "max": "min"}


def lines_in_scope(path, src):
    """Line numbers of the named code: code lines, not docstrings; common.py above its fence only."""
    tree = ast.parse(src)
    skip = set()
    for node in ast.walk(tree):  # docstrings
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
            d = node.body[0]
            skip.update(range(d.lineno, d.end_lineno + 1))
    last = len(src.splitlines())
    if os.path.basename(path) == "common.py":
        last = next(i for i, line in enumerate(src.splitlines(), 1) if line.startswith(FENCE))
    return {i for i in range(1, last + 1)} - skip


def mutants(path):
    """[(line, description, mutated source)] of one file."""
    src = open(path).read()
    lines, scope, out = src.splitlines(keepends=True), lines_in_scope(path, src), []

    def at(line, c0, c1, new, what):
        text = lines[line - 1]
        out.append((line, what, "".join(lines[:line - 1]) + text[:c0] + new + text[c1:] + "".join(lines[line:])))

    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        (l0, c0), (l1, c1), s = tok.start, tok.end, tok.string
        if l0 not in scope or l0 != l1:
            continue
        if tok.type in (tokenize.OP, tokenize.NAME) and s in SWAP:
            at(l0, c0, c1, SWAP[s], f"{s} -> {SWAP[s]}")
        elif tok.type == tokenize.NUMBER and not s.endswith("j"):
            v = ast.literal_eval(s)
            new = repr(v + 1) if isinstance(v, int) else repr(v * 2 if v else 1.0)
            at(l0, c0, c1, new, f"{s} -> {new}")
    one_line = lambda n: n.lineno == n.end_lineno and n.lineno in scope  # noqa: E731
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and one_line(node):
            at(node.lineno, node.col_offset, node.operand.col_offset, "", "unary minus dropped")
        if not isinstance(node, ast.Call):
            continue
        args = [a for a in node.args if not isinstance(a, ast.Starred)]
        for a, b in zip(args, args[1:]):
            ta, tb = ast.get_source_segment(src, a), ast.get_source_segment(src, b)
            if one_line(a) and one_line(b) and a.lineno == b.lineno and ta != tb:
                line = lines[a.lineno - 1]
                new = line[:a.col_offset] + tb + line[a.end_col_offset:b.col_offset] + ta + line[b.end_col_offset:]
                at(a.lineno, 0, len(line), new, f"arguments swapped: {ta}, {tb}")
        for k in node.keywords:
            if k.arg is None or not one_line(k):
                continue
            line, c0, c1 = lines[k.lineno - 1], k.col_offset, k.end_col_offset
            if line[c1:].startswith(", "):
                c1 += 2
            elif line[:c0].endswith(", "):
                c0 -= 2
            at(k.lineno, c0, c1, "", f"keyword {k.arg} dropped")
    return [m for m in out if _compiles(m[2])]


def _compiles(src):
    try:
        compile(src, "<mutant>", "exec")
        return True
    except SyntaxError:
        return False


def run_one(job, timeout):
    """Run the file's tests on one mutant in a copy of the repository: killed / survived / timeout."""
    path, line, what, src = job
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        for name in os.listdir(ROOT):
            if name.endswith(".py") or name in ("tests", "pytest.ini", "tools", "docs", "README.md", "bench"):
                p = os.path.join(ROOT, name)
                (shutil.copytree if os.path.isdir(p) else shutil.copy)(p, os.path.join(tmp, name))
        with open(os.path.join(tmp, path), "w") as f:
            f.write(src)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                *TESTS[path]], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            status = "survived" if r.returncode == 0 else "killed"
            tail = r.stdout.strip().splitlines()[-1:] if r.returncode else []
        except subprocess.TimeoutExpired:
            status, tail = "timeout", []
    return {"file": path, "line": line, "mutant": what, "status": status, "seconds": round(time.time() - t0, 1),
            "code": src.splitlines()[line - 1].strip(), "first_failure": tail[0] if tail else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true")
    p.add_argument("--only", default=None, help="one file of TESTS")
    p.add_argument("--sample", type=int, default=None, help="a seeded random sample of N mutants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="mutants.jsonl")
    args = p.parse_args()
    jobs = [(f, *m) for f in TESTS if args.only in (None, f) for m in mutants(os.path.join(ROOT, f))]
    if args.list:
        for f in TESTS:
            print(f"{f:<18}{sum(j[0] == f for j in jobs):6d} mutants")
        return
    if args.sample:
        jobs = random.Random(args.seed).sample(jobs, min(args.sample, len(jobs)))
    done = set()
    if os.path.exists(args.out):  # resume: skip the mutants already run
        done = {(r["file"], r["line"], r["mutant"]) for r in map(json.loads, open(args.out))}
    jobs = [j for j in jobs if j[:3] not in done]
    print(f"{len(jobs)} mutants to run, {len(done)} already in {args.out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool, open(args.out, "a") as f:
        for i, r in enumerate(pool.map(lambda j: run_one(j, args.timeout), jobs), 1):
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"[{i}/{len(jobs)}] {r['status']:<8} {r['file']}:{r['line']} {r['mutant']}  ({r['seconds']} s)",
                  flush=True)
    rows = [json.loads(line) for line in open(args.out)]
    killed = sum(r["status"] != "survived" for r in rows)
    print(f"score {killed}/{len(rows)} = {100 * killed / max(len(rows), 1):.1f} % (before removing equivalent mutants)")


if __name__ == "__main__":
    main()

"""docs/reproduce.md launches as written: every training and probe command of its matrix is parsed by
its script's own parser (a typo'd flag fails even where a run is grouped with others), every distinct
flag set trains one step on the synthetic set with its sizes shrunk (its other flags kept) and is
probed as its rows say; and bench/methods.py --smoke prints a row for every method with positive
numbers.

The matrix: every table of the page whose header starts `| row | paper | training command | probe
command |`; a command is a code span in those two columns starting with `python` or `torchrun`."""
import importlib.util
import os
import re
import shlex

import pytest
import torch

import bag_ssl
import common
import emp_ssl
import eval_linear
import multiaug_ssl
import npid_sqrtkl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "reproduce.md")
HEADER = "| row | paper | training command | probe command |"
SCRIPTS = {"emp_ssl.py": emp_ssl, "bag_ssl.py": bag_ssl, "multiaug_ssl.py": multiaug_ssl,
           "npid_sqrtkl.py": npid_sqrtkl, "eval_linear.py": eval_linear}
DATA_FLAGS = ("--dataset", "--data-dir", "--image-size")  # replaced by --dataset synthetic


def matrix(path=DOC):
    """[(row id, training command, [probe commands], cells)] of the matrix tables."""
    rows, inside = [], False
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith(HEADER):
            inside = True
        elif inside and line.startswith("| ---"):
            continue
        elif inside and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            spans = [re.findall(r"`((?:python|torchrun) [^`]+)`", c) for c in cells]
            rows.append((cells[0].strip("`"), spans[2], spans[3], cells))
        else:
            inside = False
    return rows


def command(text):
    """(script module, argv, ranks) of `python X.py ARGS` or `torchrun --nproc_per_node=G X.py ARGS`."""
    words = shlex.split(text)
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    launcher, opts = words[0], words[1:i]
    assert launcher == "python" and not opts or launcher == "torchrun" and len(opts) == 1 \
        and re.fullmatch(r"--nproc_per_node=\d+", opts[0]), text
    ranks = int(opts[0].split("=")[1]) if opts else 1
    assert words[i] in SCRIPTS, f"{text}: no script {words[i]}"
    return SCRIPTS[words[i]], words[i + 1:], ranks


def flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def parse(module, argv):
    """The script's own parser, as its main() runs it (bag_ssl resolves its data-set defaults too)."""
    if module is eval_linear:
        return eval_linear.parse_args(argv)
    if module is bag_ssl:
        return bag_ssl.resolve_args(argv + ["--out", os.path.join(ROOT, "runs", "never-made")])
    return module.parse_args(argv)


ROWS = matrix()


def test_the_matrix_has_every_headline_table_and_its_rows_are_whole():
    ids = [r[0] for r in ROWS]
    assert len(ids) == len(set(ids)), "row ids repeat"
    # each table of the brief, by the row-id prefix it is written under, and its number of rows
    expect = {"emp-t1-": 4, "emp-t2-": 12, "emp-t3-": 4, "emp-t4-": 2, "emp-t5-": 4, "bag-c10-": 8, "bag-c100-": 8,
              "bag-in100-": 8, "ma-e3-": 6, "ma-d1-": 23, "npid-t1-": 12, "npid-t3-": 12, "npid-t6-": 10,
              "npid-t8-": 4}
    assert {p: sum(i.startswith(p) for i in ids) for p in expect} == expect
    for rid, train, probes, cells in ROWS:
        assert len(cells) == 6 and all(cells), rid  # id, paper, training, probes, estimate, ours
        assert len(train) == 1 and probes, rid
        _, targv, _ = command(train[0])
        out = flag(targv, "--out")
        assert out and out.startswith("runs/"), rid
        for p in probes:  # each probe reads its row's run
            module, pargv, _ = command(p)
            assert module is eval_linear and flag(pargv, "--ckpt") == out, (rid, p)
        assert re.search(r"\d", cells[1]) and re.search(r"\d", cells[4]), rid  # a paper number, an estimate


def test_every_command_parses_with_its_script_and_its_batch_splits_over_its_ranks():
    for rid, train, probes, _ in ROWS:
        module, argv, ranks = command(train[0])
        args = parse(module, argv)  # a UserError (one line, exit 2 under run_cli) fails the test
        assert args.batch_size % ranks == 0, f"{rid}: --batch-size {args.batch_size} over {ranks} ranks"
        assert args.dataset == flag(argv, "--dataset"), rid
        for p in probes:
            parse(eval_linear, command(p)[1])


def test_a_typo_in_a_command_is_caught_by_its_parser():
    """What the parse test relies on: a misspelt or shortened flag is an error, never taken for another."""
    for text in (ROWS[0][1][0], ROWS[0][2][0]):
        module, argv, _ = command(text)
        with pytest.raises(common.UserError, match="unrecognized arguments: --epoch"):
            parse(module, argv + ["--epoch", "1"])


# --- one step of every distinct flag set on the synthetic set ------------------------------


def shrink(argv, probe=False):
    """argv on the synthetic set at toy size: the data flags replaced, size flags shrunk, the rest kept."""
    out, i = [], 0
    while i < len(argv):
        k, v = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if k in DATA_FLAGS or k in ("--out", "--ckpt", "--batch-size", "--subset", "--epochs", "--out-size"):
            i += 2
            continue
        if k == "--train-dataset":
            v = "synthetic"
        elif k == "--patches":
            v = str(min(int(v), 1 if probe else 3))
        elif k == "--views":  # 3 keep the M > 2 path of the multi-view loss; 2 the probe's augmented view
            v = str(min(int(v), 2 if probe else 3))
        elif k == "--pdim":
            v = "16"
        elif k == "--proj":
            v = "-".join("32" for _ in v.split("-"))
        if v is not None and not v.startswith("--"):
            out += [k, v]
            i += 2
        else:
            out.append(k)
            i += 1
    if probe:
        return out + ["--dataset", "synthetic", "--subset", "16", "--test-subset", "8", "--linear-epochs", "1",
                      "--knn-k", "3", "--workers", "0"]
    return out + ["--dataset", "synthetic", "--subset", "16", "--batch-size", "4", "--out-size", "8",
                  "--max-steps", "1", "--workers", "0", "--log-every", "1"]


def groups():
    """{(script, shrunk training argv): (first row id, {shrunk probe argv})}: every distinct training flag
    set once; a probe flag set once per script, backbone and view kind (what the probe reads of a
    checkpoint: its architecture, fixed-size patches or --multiscale crops), on the first such run."""
    found, probed = {}, set()
    for rid, train, probes, _ in ROWS:
        module, argv, _ = command(train[0])
        key = (module.__name__, tuple(shrink(argv)))
        kind = (module.__name__, flag(argv, "--arch"), "--multiscale" in argv)
        ps = found.setdefault(key, (rid, set()))[1]
        for p in probes:
            pargv = tuple(shrink(command(p)[1], probe=True))
            if (kind, pargv) not in probed:
                probed.add((kind, pargv))
                ps.add(pargv)
    return found


GROUPS = groups()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy steps gain nothing from a second thread, and lose much when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


pytestmark = pytest.mark.usefixtures("cached_synthetic")  # tests/conftest.py


from cli_util import call  # noqa: E402  (tests/cli_util.py)


@pytest.mark.parametrize("key", list(GROUPS), ids=[v[0] for v in GROUPS.values()])
def test_each_flag_set_trains_a_step_on_synthetic_and_its_probes_run(key, tmp_path, capsys):
    name, argv = key
    out = str(tmp_path / "run")
    code, _, err = call(SCRIPTS[name + ".py"].main, list(argv) + ["--out", out], capsys)
    assert code == 0 and os.path.exists(os.path.join(out, "checkpoint.pt")), (argv, err[-20:])
    for pargv in sorted(GROUPS[key][1]):
        code, stdout, err = call(eval_linear.main, ["--ckpt", out, *pargv], capsys)
        assert code == 0 and "wrote" in stdout, (argv, pargv, err[-20:])


# --- bench/methods.py -----------------------------------------------------------------------


@pytest.mark.slow
def test_methods_bench_smoke_prints_every_method_row_with_positive_numbers(capsys):
    spec = importlib.util.spec_from_file_location("bench_methods", os.path.join(ROOT, "bench", "methods.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--device", "cpu"])
    text = capsys.readouterr().out
    head = next(line for line in text.splitlines() if line.startswith("row ") and "time/" in line).split()
    table = {line.split()[0]: line.split() for line in text.splitlines()
             if line.split() and line.split()[0] in bench.ROWS and len(line.split()) == len(head)}
    assert list(table) == list(bench.ROWS), text
    for row, cells in table.items():
        numbers = [float(c.replace(",", "")) for c in cells[1:]]
        assert all(v > 0 for v in numbers), (row, cells)
    ref = table["npid"]
    assert ref[-3:] == ["1.00", "1.00", "1.00"], ref  # the reference row against itself
    for row, cells in table.items():  # each ratio is the row's value over the reference's
        step, ref_step = float(cells[head.index("step_s")]), float(ref[head.index("step_s")])
        assert abs(float(cells[-3]) - step / ref_step) <= 0.01 + 0.01 * step / ref_step, (row, cells)

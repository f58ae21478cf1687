"""The refactor that cut common.py below 1,000 lines (issue "Minimal again") changed no method's
numbers: each method's loss terms at steps 1-3 and its checkpoint's keys on the synthetic set equal
the values recorded before it (tests/fixtures/steps_before.json, written by
`python tests/test_unchanged.py --record` on the code before the change; recorded again, unchanged code,
when the synthetic set changed to coarse textures, after the old fixture had passed on the cut code)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bag_ssl  # noqa: E402
import emp_ssl  # noqa: E402
import multiaug_ssl  # noqa: E402
import npid_sqrtkl  # noqa: E402

pytestmark = pytest.mark.slow  # the full run only (python -m pytest -q --full)

FIXTURE = Path(__file__).parent / "fixtures" / "steps_before.json"
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--epochs", "1", "--max-steps", "3",
        "--log-every", "1", "--seed", "3"]
RUNS = {  # NPID at the image side (32 px): its Feature Calibrate resize is one the change made antialiased
    "emp_ssl": (emp_ssl, ["--patches", "3", "--patch-size", "16", "--out-size", "16", "--proj", "64-32"]),
    "bag_ssl_vicreg": (bag_ssl, ["--loss", "vicreg", "--arch", "resnet18", "--proj", "64-32", "--out-size", "16"]),
    "bag_ssl_byol": (bag_ssl, ["--loss", "byol", "--arch", "resnet18", "--proj", "64-32", "--pred-hidden", "48",
                               "--out-size", "16"]),
    "multiaug_ssl": (multiaug_ssl, ["--arch", "resnet18", "--views", "3", "--pdim", "32", "--out-size", "16"]),
    "npid_sqrtkl": (npid_sqrtkl, ["--out-size", "32", "--subset", "48"]),
}


def run(name, out):
    """One thread, as recorded: the thread count reorders sums, and three steps carry it to rel 3e-3."""
    module, flags = RUNS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module.main(TINY + flags + ["--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    with open(Path(out) / "metrics.jsonl") as f:
        steps = [{k: v for k, v in json.loads(line).items() if k not in ("lr", "elapsed_s", "epoch")
                  and not k.endswith("_per_s") and k != "inst_acc"} for line in f]
    ckpt = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    return {"steps": steps, "model_keys": sorted(ckpt["model"]), "backbone_keys": sorted(ckpt["backbone"]),
            "state_keys": sorted(ckpt.get("state", {}))}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_loss_terms_and_checkpoint_keys_equal_the_recorded_ones(name, tmp_path):
    before = json.loads(FIXTURE.read_text())[name]
    now = run(name, tmp_path / "run")
    assert now["model_keys"] == before["model_keys"] and now["backbone_keys"] == before["backbone_keys"]
    assert now["state_keys"] == before["state_keys"]
    assert [s["step"] for s in now["steps"]] == [s["step"] for s in before["steps"]] == [1, 2, 3]
    for got, want in zip(now["steps"], before["steps"]):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-5), (k, got["step"])


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        FIXTURE.write_text(json.dumps({name: run(name, Path(d) / name) for name in RUNS}, indent=1) + "\n")
    print(f"wrote {FIXTURE}")

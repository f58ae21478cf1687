"""Reading eval_linear.py's result file (one eval-<setting>.json per probe setting in a folder)."""
import glob
import json
import os


def eval_result(folder):
    """The one eval-*.json in folder (a test probes each folder with one setting)."""
    files = glob.glob(os.path.join(str(folder), "eval-*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return json.load(f)

"""python exp.py method seed [extra flags...]: train on the candidate synthetic set, probe trained + random.
BUG=onecrop|noinv|frozen plants a bug first: multiaug's views all one crop / Barlow's invariance term dropped /
NPID's bank never updated."""
import sys, json, os, time, shutil
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/tmp")
import torch
torch.set_num_threads(int(os.environ.get("T", "2")))
import common
import eval_linear, emp_ssl, bag_ssl, multiaug_ssl, npid_sqrtkl
M = {"emp": emp_ssl, "bag": bag_ssl, "ma": multiaug_ssl, "npid": npid_sqrtkl}
bug = os.environ.get("BUG")
if bug == "onecrop":
    views = common.sample_views
    def one_crop(images, m, *a, **k):
        v, boxes = views(images, 1, *a, **k)
        return v.repeat(m, 1, 1, 1), boxes.repeat(m, 1)
    common.sample_views = one_crop
elif bug == "noinv":
    barlow = multiaug_ssl.barlow_loss
    def no_invariance(Z, lam):
        _, inv, red = barlow(Z, lam)
        return lam * red, inv, red
    multiaug_ssl.barlow_loss = no_invariance
elif bug == "frozen":
    npid_sqrtkl.global_batch_update = lambda *a, **k: None
method, seed, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
tag = os.environ.get("TAG", "x")
out = f"/tmp/exp/{method}-{tag}-s{seed}"
shutil.rmtree(out, ignore_errors=True)
t0 = time.time()
if method != "none":
    M[method].main(extra + ["--dataset", "synthetic", "--seed", seed, "--out", out, "--workers", "0"])
t1 = time.time()
PROBES = {"patch1": ["--mode", "bag", "--patches", "1", "--patch-size", "16", "--out-size", "16"],
          "central16": ["--mode", "central", "--out-size", "16"],
          "bag4": ["--mode", "bag", "--patches", "4", "--patch-size", "16", "--out-size", "16"],
          "bag2": ["--mode", "bag", "--patches", "2", "--patch-size", "16", "--out-size", "16"],
          "central32": ["--mode", "central", "--out-size", "32"]}
if os.environ.get("PROBES"):
    PROBES = {k: PROBES[k] for k in os.environ["PROBES"].split(",")}
res = {}
for name, p in PROBES.items():
    for ck in (["random"] if method == "none" else [out + "/checkpoint.pt"]):
        o = f"{out}-probe-{name}-{'r' if ck == 'random' else 't'}"
        r = eval_linear.main(["--ckpt", ck, "--dataset", "synthetic", "--arch", "resnet18", "--probe", "knn", "--knn-k", "20",
                              "--subset", "500", "--test-subset", "250", "--workers", "0", "--seed", seed, "--out", o] + p)
        res[name] = round(r["knn"]["k20"], 1)
print("RESULT", method, tag, seed, json.dumps(res), f"train {t1-t0:.0f}s probe {time.time()-t1:.0f}s", " ".join(extra), flush=True)

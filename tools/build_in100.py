"""Build the ImageNet-100 ImageFolder tree (train/, val/ of symlinks) from a full ImageNet folder:

    python tools/build_in100.py --imagenet /data/imagenet --out /data/in100

The 100 classes are those of CMC (Tian, Krishnan, Isola 2019, arXiv:1906.05849), used by solo-learn,
EMP-SSL and BagSSL. Step by step, with the disk each step takes: docs/in100.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import fail  # noqa: E402

# The 100 ImageNet classes of CMC (Tian et al. 2019), used by solo-learn, EMP-SSL and BagSSL.
IN100_CLASSES = """
n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split()


def build_in100(imagenet, out):
    """Build the in100 ImageFolder tree (train/, val/) of symlinks from a full ImageNet folder
    whose train/ and val/ both hold one sub-folder per class."""
    for split in ("train", "val"):  # check both splits before writing anything
        src = os.path.join(imagenet, split)
        missing = [c for c in IN100_CLASSES if not os.path.isdir(os.path.join(src, c))]
        if missing:
            fail(f"{src} lacks class folders {missing[:3]}... (val/ must be sorted into class folders)")
    for split in ("train", "val"):
        src = os.path.join(imagenet, split)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for c in IN100_CLASSES:
            dst = os.path.join(out, split, c)
            if not os.path.lexists(dst):
                os.symlink(os.path.realpath(os.path.join(src, c)), dst)
    print(f"in100: {len(IN100_CLASSES)} classes linked under {out}/train and {out}/val")


def main(argv=None):
    p = common.ArgParser(description=__doc__)
    p.add_argument("--imagenet", required=True, help="full ImageNet folder holding train/ and val/ (one folder per class)")
    p.add_argument("--out", required=True, help="where to create in100/{train,val}")
    args = p.parse_args(argv)
    if not os.path.isdir(args.imagenet):
        fail(f"ImageNet folder '{args.imagenet}' not found")
    build_in100(args.imagenet, args.out)


if __name__ == "__main__":
    common.run_cli(main, training=False)

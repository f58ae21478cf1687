"""Sort Tiny ImageNet's validation images into class folders, so that val/ is an ImageFolder tree
(val/<wnid>/<file>) that the effssl loaders read as the test split, class ids the sorted wnids as in train/.
The archive unpacks them as val/images/<file>, labelled by val/val_annotations.txt ("<file> <wnid> <x> <y>
<w> <h>", tab-separated). Each annotated image is moved, or with --link symlinked: then the originals are kept
in <root>/val_images/, outside val/ (every folder in val/ is read as a class). Running it again is harmless.

    python tools/tinyimagenet_val.py --root data/tinyimagenet/tiny-imagenet-200 [--link]
"""
import argparse
import os
import sys


def fail(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def sort_val(root, link=False):
    """Place each annotated image at val/<wnid>/<file>, every line checked first; (placed now, already there)."""
    val, images, kept, train = (os.path.join(root, d) for d in ("val", "val/images", "val_images", "train"))
    ann = os.path.join(val, "val_annotations.txt")
    if not os.path.isfile(ann):
        fail(f"{ann} not found: --root must be the unpacked tiny-imagenet-200 folder")
    classes = {d.name for d in os.scandir(train) if d.is_dir()} if os.path.isdir(train) else None
    with open(ann) as f:
        rows = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    src_dir, todo = kept if link and not os.path.isdir(images) else images, []
    for n, parts in rows:
        if len(parts) < 2 or (classes is not None and parts[1] not in classes):
            fail(f"{ann} line {n}: expected '<file> <wnid> ...', a wnid of train/, not {' '.join(parts)!r}")
        src, dst = os.path.join(src_dir, parts[0]), os.path.join(val, parts[1], parts[0])
        if not os.path.lexists(dst):
            todo.append((parts[0], dst)) if os.path.isfile(src) else fail(f"{src} not found ({ann} line {n})")
    if link and src_dir == images:  # the originals leave val/, so that a scan of val/ sees only classes
        os.rename(images, src_dir := kept)
    for name, dst in todo:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        src = os.path.join(src_dir, name)
        os.symlink(os.path.realpath(src), dst) if link else os.replace(src, dst)
    if os.path.isdir(images) and not os.listdir(images):
        os.rmdir(images)  # an empty images/ would be read as a class of its own
    return len(todo), len(rows) - len(todo)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: fail(f"{msg} (see {p.prog} --help)")
    p.add_argument("--root", required=True, help="the unpacked tiny-imagenet-200 folder")
    p.add_argument("--link", action="store_true", help="symlink the images instead of moving them")
    args = p.parse_args()
    placed, there = sort_val(args.root, args.link)
    print(f"{os.path.join(args.root, 'val')}: {placed} images {'linked' if args.link else 'moved'}, {there} "
          f"already in their class folders")

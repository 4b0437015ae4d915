"""Keep the shared parts of the four training scripts word for word the same.

byol.py is the source. Its blocks between "# >>> shared: NAME" and "# <<< shared: NAME"
are written into the same-named blocks of simsiam.py, bn_only.py, contrastive.py and redundancy.py; everything outside
the blocks (docstring, imports, recipes, the method) is each script's own.

    python .ci/sync_shared.py           # copy byol.py's shared blocks into the other two
    python .ci/sync_shared.py --check   # exit 1 and show the difference where they differ (the tests run this)
"""

import argparse
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "byol.py"
TARGETS = ("simsiam.py", "bn_only.py", "contrastive.py", "redundancy.py")
BLOCK = re.compile(r"^# >>> shared: (\w+).*?^# <<< shared: \1\n", re.S | re.M)


def blocks(text, name):
    found = {m.group(1): m for m in BLOCK.finditer(text)}
    if not found:
        raise SystemExit(f"sync_shared.py: error: {name} has no '# >>> shared: NAME' ... '# <<< shared: NAME' blocks")
    return found


def synced(source_text, target_text, target_name):
    """target_text with each shared block replaced by the source's."""
    source, target = blocks(source_text, SOURCE), blocks(target_text, target_name)
    if set(source) != set(target):
        raise SystemExit(
            f"sync_shared.py: error: {target_name} has shared blocks {sorted(target)}, {SOURCE} has "
            f"{sorted(source)}; add or remove the markers so that they match"
        )
    return BLOCK.sub(lambda m: source[m.group(1)].group(0), target_text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a target's shared blocks differ")
    p.add_argument(
        "--root", type=Path, default=ROOT, help="the folder holding the scripts (default: this repository)"
    )
    args = p.parse_args(argv)
    source_text = (args.root / SOURCE).read_text()
    stale = []
    for name in TARGETS:
        path = args.root / name
        text = path.read_text()
        new = synced(source_text, text, name)
        if new == text:
            continue
        stale.append(name)
        if args.check:
            diff = difflib.unified_diff(
                text.splitlines(True), new.splitlines(True), f"{name} (now)", f"{name} (from {SOURCE})", n=1
            )
            sys.stdout.writelines(list(diff)[:60])
        else:
            path.write_text(new)
            print(f"wrote the shared blocks of {SOURCE} into {name}")
    if args.check and stale:
        print(
            f"sync_shared.py: {', '.join(stale)} differ from {SOURCE} in their shared blocks; "
            f"run python .ci/sync_shared.py (after editing {SOURCE}, not the copies)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print a pex "complete platform" (JSON) for Linux on ARCH with glibc <= GLIBC, derived from the
interpreter running this script (same Python version and ABI), for ``make dist``.

    python scripts/pex-platform.py aarch64 2.28 > aarch64.json

Why: pex's abbreviated ``--platform manylinux2014_aarch64-...`` accepts only manylinux2014 and
older wheels, and some dependencies (greenlet) now publish only manylinux_2_24/2_28 ones; a
complete platform lists every tag the device accepts. Plain ``linux_<arch>`` tags are left out
so that a wheel built on this machine can never be picked for a device.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


def main() -> None:
    arch, glibc = sys.argv[1], sys.argv[2]
    major, minor = (int(x) for x in glibc.split("."))
    pex3 = Path(sys.executable).with_name("pex3")
    out = subprocess.run(
        [str(pex3), "interpreter", "inspect", "--markers", "--tags"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(out.stdout)
    here = info["marker_environment"]["platform_machine"]
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    tags = []
    for tag in info["compatible_tags"]:
        interp, abi, plat = tag.split("-")
        if not plat.endswith("_" + here):
            if plat == "any":
                tags.append(tag)
            continue
        name = plat.removesuffix("_" + here)
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)", name)
        version = (int(m[1]), int(m[2])) if m else legacy.get(name)
        if version is None or version > (major, minor):
            continue  # linux_<arch> (locally built), or needs a newer glibc than the device's
        tags.append(f"{interp}-{abi}-{name}_{arch}")
    env = dict(info["marker_environment"], platform_machine=arch)
    json.dump({"compatible_tags": tags, "marker_environment": env}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

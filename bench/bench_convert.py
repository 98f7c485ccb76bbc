"""Real-dataset conversion: throughput against the PNG-decoding floor, and memory that stays
flat as the dataset grows (the converters stream), in one run.

Writes RHD-layout example datasets (``cmkg.data.convert.examples``: 320x320 colour, two-byte
depth and label-mask PNGs, Python 2 pickle) of N and 2N training images, then

* decodes every PNG of the N-image set with Pillow, nothing else (the I/O floor), and
* runs ``cmkg data convert rhd`` on each set in a fresh process (crop, resize, depth decode,
  Parquet + checksums), reporting images/s and the process's peak RSS.

    python bench/bench_convert.py [--num 300] [--size 256]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cmkg.data.convert.examples import write_rhd


def convert(root: Path, out: Path, size: int) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one conversion in its own process."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from this (larger) process
    code = ("import re, time\n"
            "from cmkg.data.convert import rhd\n"
            "t = time.perf_counter()\n"
            f"rhd.convert({str(root)!r}, {str(out)!r}, size={size}, progress=False)\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]\n"
            "print(time.perf_counter() - t, int(hwm) / 1024)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, rss = res.stdout.split()
    return float(seconds), float(rss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=300, help="training images of the smaller set")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    n_eval = 16
    roots = {}
    for n in (args.num, 2 * args.num):
        roots[n] = tmp / f"rhd-{n}"
        t = time.perf_counter()
        write_rhd(roots[n], n_train=n, n_eval=n_eval)
        print(f"wrote an RHD-layout example of {n} + {n_eval} images in "
              f"{time.perf_counter() - t:.1f}s", file=sys.stderr)

    small = roots[args.num]
    pngs = sorted(small.glob("*/*/*.png"))
    t = time.perf_counter()
    for p in pngs:
        np.asarray(Image.open(p))
    floor = (len(pngs) / 3) / (time.perf_counter() - t)  # samples (3 PNGs each) per second

    rows = {}
    for n, root in roots.items():
        seconds, rss = convert(root, tmp / f"out-{n}", args.size)
        rows[n] = ((n + n_eval) / seconds, rss)
    print(f"RHD conversion to {args.size}px, 320x320 sources, 2 threads, "
          f"{Path('/proc/cpuinfo').read_text().count('processor')} cores")
    print(f"  {'what':34s} {'images/s':>9s} {'vs decode':>9s} {'peak RSS MiB':>13s}")
    print(f"  {'decode 3 PNGs per image (floor)':34s} {floor:9.1f} {1.0:9.2f} {'-':>13s}")
    for n, (rate, rss) in rows.items():
        print(f"  {f'convert {n + n_eval} images':34s} {rate:9.1f} {rate / floor:9.2f} "
              f"{rss:13.0f}")
    (r1, m1), (r2, m2) = rows.values()
    print(f"  peak RSS at 2x the images / 1x: {m2 / m1:.2f} (flat = streaming)")


if __name__ == "__main__":
    main()

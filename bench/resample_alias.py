"""Aliasing of ``original_res`` -> ``target_res`` down-sampling (issue 15, part 6).

White noise (std 1) at 4 nm resampled to 12 nm (3x on every axis). Without a low-pass
filter the destination centres fall on source voxels and the noise passes almost
untouched; a 3x3x3 box mean (what a 12 nm detector would integrate) leaves 1/sqrt(27).
Printed: the std after the plain linear interpolation (``before``, the same GridMap with
its filter switched off), after the anti-aliased resampling (``after``) and after a box
mean. These
are counts and ratios, independent of machine load.

    .venv/bin/python bench/resample_alias.py [--size 90] [--factor 3]
"""

from __future__ import annotations

import argparse

import numpy as np

from catena_mito.blockwise.geometry import Roi
from catena_mito.preprocess import GridMap


class _Unfiltered(GridMap):
    """The resampling as it was before anti-aliasing: one tap on every axis."""

    def antialias_taps(self, axis: int) -> np.ndarray:
        return np.ones(1, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=90)
    ap.add_argument("--factor", type=int, default=3)
    args = ap.parse_args()
    n, k = args.size, args.factor
    noise = np.random.default_rng(0).standard_normal((n, n, n)).astype(np.float32)
    src, dst = (4.0,) * 3, (4.0 * k,) * 3
    rows = {}
    for name, cls in (("before (no filter)", _Unfiltered), ("after (anti-aliased)", GridMap)):
        gm = cls.between(noise.shape, src, dst)
        rows[name] = gm.resample(noise, Roi.from_shape(noise.shape), Roi.from_shape(gm.dst_shape))
    m = n // k
    rows[f"box mean {k}^3"] = noise[: m * k, : m * k, : m * k].reshape(m, k, m, k, m, k).mean((1, 3, 5))
    print(f"white noise std 1.0, {n}^3 voxels at 4 nm -> {k}x down-sampled")
    for name, out in rows.items():
        print(f"  {name:22s} std {out.std():.3f}")


if __name__ == "__main__":
    main()

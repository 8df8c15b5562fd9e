"""Wall time of the segmentation decoder's convolutions, as built and as flax's native layers.

    python -m benchmarks.decoders [--repeats=5] [--preset=tiny]

At `configs/seg_3d.py`'s sizes (a batch of 2 volumes of 32 x 64 x 64, patch (4, 16, 16), UNETR
feature size 4) and `configs/seg_2d.py`'s (16 X-rays of 64 x 64, feature size 16): for each
conv of UNETR's full-size stage (3x3(x3), the widest input) and its x2 upsampling, the median
forward and forward + backward seconds of `decoders.Conv` / `decoders.Upsample` beside
`nn.Conv` / `nn.ConvTranspose` with the same parameters; then the whole UNETR (forward +
backward through the decoder). `--preset=tiny` runs the same measurements at toy sizes (a smoke
test, not a measurement). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import time_calls
from unimedi_jax.eval import decoders

# (name, batch, spatial, patch, feature size, token width): the two segmentation defaults.
CASES = {
    "default": (("seg_3d", 2, (32, 64, 64), (4, 16, 16), 4, 128),
                ("seg_2d", 16, (64, 64), (16, 16), 16, 128)),
    "tiny": (("seg_3d", 1, (8, 32, 32), (4, 16, 16), 2, 16),
             ("seg_2d", 2, (32, 32), (16, 16), 4, 16)),
}


def _median(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    return float(np.median(time_calls(lambda: jax.block_until_ready(fn()), repeats)[0]))


def _fwd_bwd(apply, params, x, repeats: int) -> tuple[float, float]:
    fwd = jax.jit(apply)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2), argnums=(0, 1)))
    return _median(lambda: fwd(params, x), repeats), _median(lambda: grad(params, x), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", choices=sorted(CASES), default="default")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    report = {"backend": jax.default_backend()}
    for name, batch, spatial, patch, fs, width in CASES[args.preset]:
        ndim = len(spatial)
        # the decoder's full-size ResBlock conv: its input is the concat of fs + fs channels
        x = jnp.asarray(rng.standard_normal((batch, *spatial, 2 * fs)), jnp.float32)
        half = jnp.asarray(rng.standard_normal((batch, *(n // 2 for n in spatial), 2 * fs)),
                           jnp.float32)
        pairs = {
            "conv3": (decoders.Conv(fs, (3,) * ndim, use_bias=False),
                      nn.Conv(fs, (3,) * ndim, padding="SAME", use_bias=False), x),
            "up2": (decoders.Upsample(fs, (2,) * ndim),
                    nn.ConvTranspose(fs, (2,) * ndim, strides=(2,) * ndim, padding="VALID",
                                     use_bias=False), half),
        }
        for layer, (ours, native, inp) in pairs.items():
            params = ours.init(jax.random.key(0), inp)
            for label, module in (("ours", ours), ("flax", native)):
                f, fb = _fwd_bwd(module.apply, params, inp, args.repeats)
                report[f"{name}/{layer}/{label}"] = {"fwd_s": f, "fwd_bwd_s": fb}
                print(f"{name:7s} {layer:6s} {label:5s} forward {f:8.4f} s   "
                      f"forward+backward {fb:8.4f} s", flush=True)
        grid = tuple(n // p for n, p in zip(spatial, patch))
        unetr = decoders.UNETR(1, patch, depth=4, feature_size=fs)
        vol = jnp.asarray(rng.standard_normal((batch, *spatial)), jnp.float32)
        tokens = jnp.asarray(rng.standard_normal((batch, int(np.prod(grid)), width)),
                             jnp.float32)
        layers = [tokens] * len(unetr.skip_layers)
        params = unetr.init(jax.random.key(0), vol, tokens, layers, grid)
        f, fb = _fwd_bwd(lambda p, t: unetr.apply(p, vol, t, layers, grid), params, tokens,
                         args.repeats)
        report[f"{name}/unetr"] = {"fwd_s": f, "fwd_bwd_s": fb}
        print(f"{name:7s} UNETR  ours  forward {f:8.4f} s   forward+backward {fb:8.4f} s",
              flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Head-and-neck inference: the ``headneck_oar`` pipeline against AnatomyNet as published.

The pipeline (shipped weights, two stages: the organs' box on a 5 x 4 x 4 mm grid, then
the organs at 2.5 x 1 x 1 mm in the box) runs on a 512x512x180 phantom, warmed first as
the node warms it. The peer, in the same process and on the same device, is one
whole-volume pass of AnatomyNet at the paper's width (28 channels, one stride-2
down-sampling in all three axes, as in the public code) over the paper's crop
(176 x 304 x 224 voxels); its weights are random, only its time counts.

Run: ``.venv/bin/python benchmarks/bench_inference_headneck.py [--slices 180] [--repeat 3]``.
Targets (issue 15): <= 30 s on the 2-core CPU, <= 0.5 s on an H100 (the paper: 0.12 s on
a 2018 GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from dicomnode.nn import runtime
from dicomnode.nn.anatomynet import AnatomyNet
from dicomnode.phantoms import make_phantom
from dicomnode.pipelines.base import get_pipeline


class _PaperAnatomyNet(AnatomyNet):
    """AnatomyNet with the public code's isotropic stride-2 first convolution."""

    def __init__(self) -> None:
        super().__init__(10, 28)
        first = self.stem[0]
        self.stem[0] = nn.Conv3d(1, first.out_channels, 3, stride=2, padding=1, bias=False)
        up = self.up[0]
        self.up[0] = nn.ConvTranspose3d(up.in_channels, up.out_channels, 2, stride=2,
                                        bias=False)


def _timed(run: object, repeat: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=180)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    phantom = make_phantom("headneck", seed=args.seed, slices=args.slices, matrix=args.matrix)

    class Volume:
        hu = phantom.hu
        spacing = phantom.spacing
        direction = None

    pipeline = get_pipeline("headneck_oar")
    pipeline.warm_up()
    result = pipeline.run(Volume)
    if not result.ok:
        sys.exit(f"no result: {result.reason}")
    ours = _timed(lambda: pipeline.run(Volume), args.repeat, runtime.select_device(
        pipeline.device_name))  # type: ignore[attr-defined]
    device = runtime.select_device(pipeline.device_name)  # type: ignore[attr-defined]
    paper = _PaperAnatomyNet().to(device).eval()
    crop = torch.randn(1, 1, 176, 304, 224, device=device)

    def whole_volume() -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.float16,
                                                    enabled=device.type == "cuda"):
            paper(crop)

    whole_volume()
    peer = _timed(whole_volume, args.repeat, device)
    where = (f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    target = "<= 0.5 s on an H100" if device.type == "cuda" else "<= 30 s on the 2-core CPU"
    ours_s, peer_s = statistics.median(ours), statistics.median(peer)
    print(f"head-and-neck inference: phantom {args.matrix}x{args.matrix}x{phantom.hu.shape[0]}"
          f", {where}, median of {args.repeat}")
    print(f"  headneck_oar pipeline (two stages, post-processing) {ours_s:7.2f} s "
          f"(target {target}); stages: " + ", ".join(
              f"{k} {v:.2f}" for k, v in result.timings.items()))
    print(f"  peer: AnatomyNet width 28, one pass over 176x304x224 {peer_s:7.2f} s")
    print(f"  ratio pipeline / paper's pass {ours_s / peer_s:7.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch peer of `cargo bench --bench finetune_blocks` (issue 22's fine-tuning speed).

  python3 scripts/bench_finetune_torch.py

One training step of EfficientNet-Lite0's top blocks as lazarus's benchmark times it:
blocks K+1..=15 and the head convolution (its BatchNorm and ReLU6) forward from a random
block-K map, mean pooling, backward from a fixed d loss / d pooled features (the sum of
pooled × upstream) to every parameter, and an AdamW update of the blocks' parameters
(lr 1e-4, weight decay 1e-4). The model is the PyPI package efficientnet-lite-pytorch's
Lite0 (random weights: the arithmetic does not depend on the values), BatchNorm in eval
mode (frozen running statistics, as lazarus folds them into the convolutions),
`torch.set_num_threads(cores)`. Each precision runs in NCHW and in channels-last memory
format (oneDNN's preferred layout on CPU) and reports both; bf16 is
`torch.autocast("cpu", torch.bfloat16)` (oneDNN's bf16 kernels where the CPU has
AVX-512 BF16, f32 master weights).

$LAZARUS_BENCH_STRIDE (8: K 4, blocks 5..=15 on 40 × 28 × 28 maps; 16: K 10),
$LAZARUS_BENCH_BATCH (32) and $LAZARUS_BENCH_ITERS (5) as for the Rust benchmark; one
warm-up step, then the best step. Prints ms per image. Not part of CI.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402

venv_ref.ensure(
    ["torch", "efficientnet_lite_pytorch"],
    ["torch", "efficientnet-lite-pytorch==0.1.0", "numpy"],
)

import torch  # noqa: E402
from efficientnet_lite_pytorch import EfficientNet  # noqa: E402

# Block K whose output the map is, by stride (Lite0: the last block of each stage).
AFTER_BLOCK = {4: 2, 8: 4, 16: 10}


class Top(torch.nn.Module):
    """Blocks K+1.. and the head convolution of `net`, then mean pooling."""

    def __init__(self, net, after_block):
        super().__init__()
        self.blocks = torch.nn.ModuleList(net._blocks[after_block + 1 :])
        self.conv_head, self.bn_head, self.activation = net._conv_head, net._bn1, net._swish

    def forward(self, x):
        for block in self.blocks:
            x = block(x, drop_connect_rate=None)
        x = self.activation(self.bn_head(self.conv_head(x)))
        return x.mean((2, 3))


def step_ms(top, optimizer, x, upstream, precision):
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        pooled = top(x)
    loss = (pooled.float() * upstream).sum()
    loss.backward()
    optimizer.step()
    return (time.perf_counter() - started) * 1e3


def main():
    stride = int(os.environ.get("LAZARUS_BENCH_STRIDE", "8"))
    batch = int(os.environ.get("LAZARUS_BENCH_BATCH", "32"))
    iterations = int(os.environ.get("LAZARUS_BENCH_ITERS", "5"))
    after_block = AFTER_BLOCK[stride]
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0")
    channels = net._blocks[after_block]._project_conv.out_channels
    side = 224 // stride
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, mkldnn "
        f"{torch.backends.mkldnn.is_available()}; blocks after block {after_block} on "
        f"{channels} x {side} x {side} maps, batch {batch}"
    )
    for precision in ("f32", "bf16"):
        for layout in ("nchw", "channels_last"):
            top = Top(net, after_block).train()
            for module in top.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()
            x = torch.randn(batch, channels, side, side)
            if layout == "channels_last":
                top = top.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            upstream = torch.empty(batch, 1280).uniform_(-1e-3, 1e-3)
            optimizer = torch.optim.AdamW(top.parameters(), lr=1e-4, weight_decay=1e-4)
            step_ms(top, optimizer, x, upstream, precision)
            best = min(step_ms(top, optimizer, x, upstream, precision) for _ in range(iterations))
            print(
                f"pytorch {precision} {layout}: best {best / batch:.2f} ms/image forward + "
                f"backward + update ({batch * 1e3 / best:.1f} images/s)"
            )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch counterpart of `rlprune bench`: the same models, batch, warm-up and statistics.

Written for this project from the architectures' descriptions (GFNet isotropic, DeiT, HorNet
with gnconv and depthwise 7x7). Only what the timing needs is modelled: the layer shapes and
the forward computation; initialisation is PyTorch's default and drop path is left out (it is
the identity at inference; rlprune's gfnet-ti has drop_path_rate 0).

    python3 benchmarks/pytorch_bench.py gfnet-ti --batch 8 --threads 2 --json
    python3 benchmarks/pytorch_bench.py deit-s --batch 8 --train

Prints one JSON line with the fields of `rlprune bench --json` (framework "pytorch").
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- GFNet (isotropic)


class GlobalFilter(nn.Module):
    """rfft2 over the token grid (norm="ortho"), a learnable complex weight, irfft2 back."""

    def __init__(self, dim, h, w):
        super().__init__()
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * 0.02)

    def forward(self, x):
        b, n, c = x.shape
        side = int(math.isqrt(n))
        x = x.view(b, side, side, c).float()
        x = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
        x = x * torch.view_as_complex(self.complex_weight)
        x = torch.fft.irfft2(x, s=(side, side), dim=(1, 2), norm="ortho")
        return x.reshape(b, n, c)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class GfBlock(nn.Module):
    """x + mlp(norm2(filter(norm1(x))))"""

    def __init__(self, dim, mlp_ratio, grid):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.filter = GlobalFilter(dim, grid, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        return x + self.mlp(self.norm2(self.filter(self.norm1(x))))


class GFNet(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=256, depth=12, mlp_ratio=4.0):
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
        self.blocks = nn.Sequential(*[GfBlock(embed_dim, mlp_ratio, grid) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x).mean(1))


# ---------------------------------------------------------------- DeiT


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class VitBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeiT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=12, heads=6, mlp_ratio=4.0):
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.blocks = nn.Sequential(*[VitBlock(embed_dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ---------------------------------------------------------------- DynamicViT (DeiT with token pruning)


class PredictorLG(nn.Module):
    """Keep/drop scores per token: local features concatenated with the policy-weighted mean."""

    def __init__(self, dim):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1)
        )

    def forward(self, x):
        x = self.in_conv(x)
        b, n, c = x.shape
        local = x[:, :, : c // 2]
        glob = x[:, :, c // 2 :].mean(1, keepdim=True)  # every remaining token is kept (policy = 1)
        return self.out_conv(torch.cat([local, glob.expand(b, n, c // 2)], dim=-1))


class DynamicViT(DeiT):
    """Inference as `rlprune bench` runs it: before blocks `pruning_loc`, keep the top
    int(N * rho^(i+1)) patch tokens by keep score, gather them, and go on with fewer tokens."""

    def __init__(self, base_rate, pruning_loc=(3, 6, 9), **kw):
        super().__init__(**kw)
        dim = self.head.in_features
        self.pruning_loc = list(pruning_loc)
        self.ratios = [base_rate ** (i + 1) for i in range(len(self.pruning_loc))]
        self.score_predictor = nn.ModuleList([PredictorLG(dim) for _ in self.pruning_loc])

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        b, n0, c = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        stage = 0
        for i, blk in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                spatial = x[:, 1:]
                score = self.score_predictor[stage](spatial)[:, :, 0]
                keep = int(n0 * self.ratios[stage])
                idx = torch.argsort(score, dim=1, descending=True)[:, :keep]
                spatial = torch.gather(spatial, 1, idx.unsqueeze(-1).expand(-1, -1, c))
                x = torch.cat([x[:, :1], spatial], dim=1)
                stage += 1
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


# ---------------------------------------------------------------- HorNet (gnconv, depthwise 7x7)


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over C of an NCHW tensor."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GnConv(nn.Module):
    """Recursive gated convolution of order `order`: widths dim/2^(order-1) .. dim."""

    def __init__(self, dim, order, s):
        super().__init__()
        self.dims = [dim // 2**i for i in range(order)][::-1]
        self.scale = s
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        total = sum(self.dims)
        self.dwconv = nn.Conv2d(total, total, 7, padding=3, groups=total, bias=True)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)])

    def forward(self, x):
        pwa, abc = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        dw = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        x = pwa * dw[0]
        for i, pw in enumerate(self.pws):
            x = pw(x) * dw[i + 1]
        return self.proj_out(x)


class HorBlock(nn.Module):
    def __init__(self, dim, order, s, layer_scale=1e-6):
        super().__init__()
        self.norm1 = LayerNormChannelsFirst(dim)
        self.gnconv = GnConv(dim, order, s)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma1[:, None, None] * self.gnconv(self.norm1(x))
        y = x.permute(0, 2, 3, 1)
        y = self.gamma2 * self.pwconv2(F.gelu(self.pwconv1(self.norm2(y))))
        return x + y.permute(0, 3, 1, 2)


class HorNet(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, depths=(2, 3, 18, 2), base_dim=64, orders=(2, 3, 4, 5), s=1.0 / 3.0):
        super().__init__()
        dims = [base_dim * 2**i for i in range(4)]
        self.downsample = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNormChannelsFirst(dims[0]))]
            + [nn.Sequential(LayerNormChannelsFirst(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList(
            [nn.Sequential(*[HorBlock(dims[i], orders[i], s) for _ in range(depths[i])]) for i in range(4)]
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


# ---------------------------------------------------------------- CNN baselines


def conv_bn(c_in, c_out, stride=1):
    """3x3 conv without bias, BatchNorm (eps 1e-5, momentum 0.1), as rlprune's ConvBn."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out))


class SmallCnn(nn.Module):
    """conv-BN-ReLU x4 (32, 32, 64, 64) with 2x2 max-pools after the 2nd and 4th, global average
    pool, linear head: rlprune's `small-cnn`, the quickstart backbone."""

    def __init__(self, in_chans=1, num_classes=10, channels=(32, 32, 64, 64)):
        super().__init__()
        c = (in_chans,) + tuple(channels)
        self.features = nn.ModuleList([conv_bn(c[i], c[i + 1]) for i in range(4)])
        self.fc = nn.Linear(c[4], num_classes)

    def forward(self, x):
        for i, layer in enumerate(self.features):
            x = F.relu(layer(x))
            if i in (1, 3):
                x = F.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


VGG16 = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0]


class VggCifar(nn.Module):
    """VGG-16 with BatchNorm, CIFAR form: 13 conv-BN-ReLU, five 2x2 max-pools (skipped once the
    map is 1x1), global average pool, one linear classifier (rlprune's `vgg16-cifar`)."""

    def __init__(self, in_chans=3, num_classes=10):
        super().__init__()
        layers, pools, c = [], [], in_chans
        for v in VGG16:
            if v == 0:
                pools.append(len(layers) - 1)
                continue
            layers.append(conv_bn(c, v))
            c = v
        self.features = nn.ModuleList(layers)
        self.pools = set(pools)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        for i, layer in enumerate(self.features):
            x = F.relu(layer(x))
            if i in self.pools and x.shape[2] >= 2 and x.shape[3] >= 2:
                x = F.max_pool2d(x, 2)
        return self.classifier(x.mean((2, 3)))


class BasicBlockA(nn.Module):
    """CIFAR basic block with the parameter-free option-A shortcut (subsample, zero-pad)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2): 16-channel stem, stages of 16/32/64 channels."""

    def __init__(self, depth=20, in_chans=3, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        blocks, c = [], 16
        for stage, w in enumerate((16, 32, 64)):
            for b in range(n):
                blocks.append(BasicBlockA(c, w, 2 if stage > 0 and b == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------- the benchmark


MODELS = {
    # name: constructor (classes, image side); see DEFAULTS for the models not at 224x224.
    "small-cnn": lambda c, img: SmallCnn(in_chans=1, num_classes=c),
    "vgg16-cifar": lambda c, img: VggCifar(num_classes=c),
    "resnet20-cifar": lambda c, img: ResNetCifar(20, num_classes=c),
    "resnet56-cifar": lambda c, img: ResNetCifar(56, num_classes=c),
    "gfnet-ti": lambda c, img: GFNet(img_size=img, num_classes=c, embed_dim=256, depth=12),
    "gfnet-xs": lambda c, img: GFNet(img_size=img, num_classes=c, embed_dim=384, depth=12),
    "deit-ti": lambda c, img: DeiT(img_size=img, num_classes=c, embed_dim=192, heads=3),
    "deit-s": lambda c, img: DeiT(img_size=img, num_classes=c, embed_dim=384, heads=6),
    "hornet-t-7x7": lambda c, img: HorNet(num_classes=c, base_dim=64),
    **{
        f"dynamicvit-deit-s-{r}": (lambda r: lambda c, img: DynamicViT(float(r), img_size=img, num_classes=c, embed_dim=384, heads=6))(r)
        for r in ("0.9", "0.8", "0.7", "0.6", "0.5")
    },
    "dynamicvit-deit-b-0.7": lambda c, img: DynamicViT(0.7, img_size=img, num_classes=c, embed_dim=768, heads=12),
}


# (in_chans, image side, classes) where rlprune's zoo entry differs from (3, 224, 1000).
DEFAULTS = {
    "small-cnn": (1, 28, 10),
    "vgg16-cifar": (3, 32, 10),
    "resnet20-cifar": (3, 32, 10),
    "resnet56-cifar": (3, 32, 10),
}


def stats(xs):
    """Median, extremes, p10/p90 with linear interpolation (NumPy's default), as rlprune."""
    s = sorted(xs)

    def q(p):
        pos = p * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"median": q(0.5), "min": s[0], "max": s[-1], "p10": q(0.1), "p90": q(0.9)}


def peak_rss_mb():
    """VmHWM of this process (the whole process's peak resident set), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--train", action="store_true", help="time forward + cross-entropy + backward + SGD step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None, help="only the model's own (as rlprune's zoo entry) is built")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (fp32; PyTorch's default TF32 settings)")
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 tensor cores in matmuls and convs (PyTorch's default: convs only)")
    a = p.parse_args(argv)
    if a.batch < 1 or a.repeats < 1 or a.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0")

    if a.threads is not None:
        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    own_chans, own_img, own_classes = DEFAULTS.get(a.model, (3, 224, 1000))
    if a.in_chans not in (None, own_chans):
        p.error(f"{a.model} is built for {own_chans} input channels")
    img = a.img_size or own_img
    a.num_classes = a.num_classes or own_classes
    device = torch.device(a.device)
    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = MODELS[a.model](a.num_classes, img).to(device)
    params = sum(t.numel() for t in model.parameters())
    x = torch.randn(a.batch, own_chans, img, img, device=device)
    y = torch.arange(a.batch, device=device) % a.num_classes

    def sync():
        # CUDA runs asynchronously: a step ends when its kernels have, as rlprune's does.
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if a.train:
        model.train()
        # rlprune bench's default optimizer: SGD, lr 0.05, momentum 0.9, weight decay 5e-4.
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sync()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
            sync()

    for _ in range(a.warmup):
        step()
    seconds = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t)

    lat = stats([1e3 * s for s in seconds])
    ips = stats([a.batch / s for s in seconds])
    report = {
        "model": a.model,
        "framework": "pytorch",
        "torch": torch.__version__,
        "device": str(device) if device.type == "cpu" else f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})",
        "mode": "train" if a.train else "infer",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "batch": a.batch,
        "threads": torch.get_num_threads(),
        "img_size": img,
        "in_chans": own_chans,
        "num_classes": a.num_classes,
        "params": params,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "images_per_s": ips["median"],
        **{f"images_per_s_{k}": ips[k] for k in ("min", "max", "p10", "p90")},
        "latency_ms": lat["median"],
        **{f"latency_ms_{k}": lat[k] for k in ("min", "max", "p10", "p90")},
        "peak_rss_mb": peak_rss_mb(),
    }
    if a.json:
        print(json.dumps(report))
    else:
        print(
            f"{a.model} ({params} params), {report['mode']} on {report['device']} (torch {torch.__version__}), batch {a.batch} at "
            f"{img}x{img}, {report['threads']} threads, {a.warmup} warm-up + {a.repeats} timed steps"
        )
        print(f"{'':<12} {'median':>10} {'min':>10} {'p10':>10} {'p90':>10} {'max':>10}")
        print(f"{'images/s':<12} " + " ".join(f"{ips[k]:>10.2f}" for k in ("median", "min", "p10", "p90", "max")))
        print(f"{'ms/batch':<12} " + " ".join(f"{lat[k]:>10.1f}" for k in ("median", "min", "p10", "p90", "max")))
        rss = report["peak_rss_mb"]
        print(f"peak RSS     {rss:.0f} MiB (process peak, VmHWM)" if rss is not None else "peak RSS     n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())

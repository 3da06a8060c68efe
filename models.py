"""CIFAR-10 architectures: small, plain nn.Modules built for accuracy per second.

Both networks follow the fast-CIFAR design popularised by airbench (Keller Jordan, 2024):
a frozen 2x2 patch-whitening layer, then three groups of conv-pool-BN-GELU-conv-BN-GELU,
global max pooling and a scaled linear head. They differ only in channel widths.
"""
import torch
from torch import nn


class Conv(nn.Conv2d):
    """3x3 'same' conv without bias (BatchNorm follows), identity-initialised."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        # Dirac init on the first in_channels filters: each block starts close to an identity map,
        # so signal passes through the untrained network and early steps are not wasted.
        torch.nn.init.dirac_(self.weight.data[: self.in_channels])


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale frozen at 1: only the bias (shift) learns.

    A learnable scale is redundant before GELU-into-BN chains and slows convergence in short runs.
    The high running-stat momentum suits runs of only a few hundred steps.
    """

    def __init__(self, num_features, momentum=0.4, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad = False


class ConvGroup(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = Conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(out_channels)
        self.conv2 = Conv(out_channels, out_channels)
        self.norm2 = BatchNorm(out_channels)
        self.activ = nn.GELU()

    def forward(self, x):
        # Pooling before BN halves the BN/GELU work at no cost in accuracy.
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class CifarNet(nn.Module):
    """Whitening stem + three ConvGroups of the given widths + max-pool + scaled linear head."""

    WHITEN_KERNEL = 2
    WHITEN_CHANNELS = 2 * 3 * WHITEN_KERNEL**2  # eigenvectors of 2x2x3 patches, with and without sign

    def __init__(self, widths, num_classes=10):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.whiten = nn.Conv2d(3, self.WHITEN_CHANNELS, kernel_size=self.WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad = False  # set from data by init_whitening, never trained
        self.activ = nn.GELU()
        w1, w2, w3 = self.widths
        self.layers = nn.Sequential(
            ConvGroup(self.WHITEN_CHANNELS, w1),
            ConvGroup(w1, w2),
            ConvGroup(w2, w3),
        )
        self.head = nn.Linear(w3, num_classes, bias=False)
        # Unit-variance weights read out at 1/width: initial logits stay near zero (which suits label
        # smoothing) and the head's per-example learning rate does not depend on the width.
        with torch.no_grad():
            self.head.weight /= self.head.weight.std()
        self.head_scale = 1 / w3

    @torch.no_grad()
    def init_whitening(self, images, eps=5e-4):
        """Set the stem to whiten 2x2 patches of `images` (normalised float NCHW).

        Decorrelating input patches makes the first layers train much faster (PCA whitening).
        """
        k = self.WHITEN_KERNEL
        patches = images.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, 3, k, k).float()
        flat = patches.reshape(len(patches), -1)
        flat = flat - flat.mean(0)
        covariance = flat.T @ flat / len(flat)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat((filters, -filters)).to(self.whiten.weight))

    def forward(self, x):
        x = self.layers(self.activ(self.whiten(x)))
        # Global max pooling: cheaper than more layers and better than average pooling here.
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.head_scale


class SmallCifarNet(CifarNet):
    """The light network for CPUs and small GPUs: PowerCifarNet(0.5), measured best per CPU-second."""

    def __init__(self, num_classes=10):
        super().__init__(widths=(32, 128, 128), num_classes=num_classes)


class PowerCifarNet(CifarNet):
    """The GPU network; width_mult scales every group's channels (1.0 = widths 64/256/256)."""

    BASE_WIDTHS = (64, 256, 256)

    def __init__(self, width_mult=1.0, num_classes=10):
        self.width_mult = width_mult
        super().__init__(widths=self.widths_for(width_mult), num_classes=num_classes)

    @classmethod
    def widths_for(cls, width_mult):
        return [round(w * width_mult) for w in cls.BASE_WIDTHS]


MODELS = {"SmallCifarNet": SmallCifarNet, "PowerCifarNet": PowerCifarNet}


def build_model(name, **kwargs):
    return MODELS[name](**kwargs)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, image_size=32):
    """Multiply-accumulates (multiply-adds) of one forward pass on one image, counting convs and linears."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total

"""CIFAR architectures: plain nn.Modules, built by name with build_model(name, **kwargs).

CifarNet (SmallCifarNet, PowerCifarNet) follows the fast-CIFAR design popularised by airbench (Keller Jordan,
2024): a frozen 2x2 patch-whitening layer, then three groups of conv-pool-BN-GELU-conv-BN-GELU, global max
pooling and a scaled linear head; the two differ only in channel widths. ResNet18/34/50 are He et al. (2016)
in their usual CIFAR form (3x3 stem, no max-pool), for comparison with the literature.

Model contract: every class in MODELS
- takes `num_classes` as a keyword argument (default 10);
- has `parameter_groups()` -> dict of lists of parameters, keys in this order:
    "filters"    trainable 4-D conv weights (the optimiser orthogonalises their updates with Muon),
    "norms"      trainable BatchNorm weights/biases and other biases (SGD at the bias rate),
    "head"       the classifier's trainable parameters (weight, and bias if any),
    "stem_bias"  parameters that train for the first few epochs only, then freeze (CifarNet's whitening
                 bias; [] elsewhere);
  every parameter trainable at construction is in exactly one group, frozen ones in none. The trainer
  builds its optimiser from these groups and never matches parameter names;
- has `init_from_data(images)` for data-dependent initialisation (images: normalised float NCHW training
  images), a documented no-op where nothing is needed, and `DATA_INIT_IMAGES`, how many images the trainer
  should pass (0: none);
- has `RECIPE`, how the trainer trains it: "muon" (airbench94_muon's rates, tuned for this design) or "sgd"
  (Nesterov SGD with warm-up and cosine decay, as the ResNet papers train ResNets).
Parameter names never change: checkpoints are loaded by name with load_state_dict.
"""
import torch
from torch import nn


def split_parameters(model, head, stem_bias=()):
    """The contract's parameter_groups, found by walking the modules (never by parameter names).

    `head` and `stem_bias` are given by the model; of the rest, trainable conv weights are filters and trainable
    BatchNorm parameters and biases are norms, in module order (the order of model.parameters()). A trainable
    parameter of any other kind is an error: it would otherwise silently get no optimiser group.
    """
    given = {id(p) for p in (*head, *stem_bias)}
    filters, norms = [], []
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in given:
                continue
            if isinstance(module, nn.Conv2d) and attr == "weight":
                filters.append(p)
            elif isinstance(module, nn.BatchNorm2d) or attr == "bias":
                norms.append(p)
            else:
                raise TypeError(f"{type(module).__name__}.{attr} fits no parameter group")
    return {"filters": filters, "norms": norms, "head": list(head), "stem_bias": list(stem_bias)}


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
    RECIPE = "muon"
    DATA_INIT_IMAGES = 5000  # whitening statistics from 5000 training images are as good as from all 50000

    def __init__(self, widths, num_classes=10):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.whiten = nn.Conv2d(3, self.WHITEN_CHANNELS, kernel_size=self.WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad = False  # set from data by init_from_data, never trained
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

    def parameter_groups(self):
        # The whitening bias is stem_bias even while the trainer holds it frozen: the group is its role.
        return split_parameters(self, head=[self.head.weight], stem_bias=[self.whiten.bias])

    @torch.no_grad()
    def init_from_data(self, images, eps=5e-4):
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


def projection(in_channels, out_channels, stride):
    """Shortcut: identity where the shape is kept, else a 1x1 conv + BN (He et al.'s option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()  # parameter-free: the residual path stays a clean identity
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet18/34). Convs have no bias: the BatchNorm after each has one."""

    expansion = 1

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = projection(in_channels, channels, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet50): deeper at about the cost of a BasicBlock.

    The stride sits on the 3x3 conv (as in kuangliu's CIFAR ResNets and torchvision's "v1.5"): a strided 1x1
    conv would drop three quarters of its input."""

    expansion = 4

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = projection(in_channels, out_channels, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """He et al. (2016) for 32x32 inputs: 3x3 stem, four stages at 32/16/8/4 pixels, average pool, linear head."""

    RECIPE = "sgd"  # airbench's rates diverge within steps on a ResNet (bench/RESULTS.md)
    DATA_INIT_IMAGES = 0  # nothing is set from data

    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        # A 3x3 stride-1 stem and no max-pool: the ImageNet 7x7/2 stem + pool would leave 8x8 maps at stage 1
        # from a 32x32 image, discarding most of its detail.
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        stages, in_channels = [], 64
        for i, (channels, count) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            # Each stage after the first halves the resolution in its first block and doubles the width.
            blocks = []
            for stride in [1 if i == 0 else 2] + [1] * (count - 1):
                blocks.append(block(in_channels, channels, stride))
                in_channels = channels * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)  # PyTorch's default Linear init, as in the references
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init for ReLU nets; fan_out keeps the backward pass's gradient variance steady.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                # Identity BN. The last BN of each block is not zero-initialised (Goyal et al. 2017): that
                # would give the block's last conv no gradient on the first step, and this is the paper's form.
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def parameter_groups(self):
        return split_parameters(self, head=[self.fc.weight, self.fc.bias])

    def init_from_data(self, images):
        """No-op: a ResNet needs no data-dependent initialisation (BatchNorm adapts from the first batch)."""

    def forward(self, x):
        x = self.layers(self.stem(x))
        # Global average pooling, as in the paper; then the linear classifier.
        return self.fc(torch.mean(x, dim=(2, 3)))


class ResNet18(ResNet):
    def __init__(self, num_classes=10):
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes=num_classes)


class ResNet34(ResNet):
    def __init__(self, num_classes=10):
        super().__init__(BasicBlock, (3, 4, 6, 3), num_classes=num_classes)


class ResNet50(ResNet):
    def __init__(self, num_classes=10):
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes=num_classes)


MODELS = {"SmallCifarNet": SmallCifarNet, "PowerCifarNet": PowerCifarNet,
          "ResNet18": ResNet18, "ResNet34": ResNet34, "ResNet50": ResNet50}


def build_model(name, **kwargs):
    """The one way to build a model by name (checkpoints store the name and the kwargs)."""
    return MODELS[name](**kwargs)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, image_size=32):
    """Multiply-accumulates of one forward pass on one image, counting convs and linears."""
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

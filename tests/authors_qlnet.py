"""The authors' QLNet, run as they wrote it, for the converter's tests (needs torch and timm).

Their `resnet.py` (github.com/liuyao12/ConvNets-PDE-perspective, HEAD a754471) is written as a
module of timm's `models` package; it is loaded as one from wherever it lies
(QHNET_AUTHORS_RESNET). Writing the committed fixture:

    PYTHONPATH=<torch and timm> QHNET_AUTHORS_RESNET=<their resnet.py> \
        python tests/authors_qlnet.py tests/fixtures/qlnet_small.npz

The fixture is a reduced QLNet (`SMALL`) built from their own `ResNet`, `make_blocks`,
`PDEBlock` and `hardball`, with random weights and BN statistics (`qlnet_small.npz`, its
state_dict's tensors), and its logits on `photos()` in float32 and float64
(`qlnet_small_logits.npz`).
"""

import importlib.util
import os
import sys
import warnings

import numpy as np
from sklearn import datasets

SMALL = dict(widths=(8, 16, 32, 64), depths=(1, 2, 1, 1), num_classes=10)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def photos(size: int = 224) -> np.ndarray:
    """Four real photos, NHWC float32, ImageNet-normalised: two crops of each of
    scikit-learn's sample images (427 x 640)."""
    crops = [image[top:top + size, left:left + size]
             for image in datasets.load_sample_images().images
             for top, left in ((0, 0), (427 - size, 640 - size))]
    return ((np.stack(crops) / 255.0 - MEAN) / STD).astype(np.float32)


def authors_module(path: str | None = None):
    """Their resnet.py, imported as timm.models._qlnet_authors."""
    path = path or os.environ['QHNET_AUTHORS_RESNET']
    importlib.import_module('timm.models')  # the package their relative imports name
    spec = importlib.util.spec_from_file_location('timm.models._qlnet_authors', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    with warnings.catch_warnings():  # it registers timm's model names again
        warnings.simplefilter('ignore')
        spec.loader.exec_module(module)
    return module


def randomize(model, seed: int = 0):
    """Every parameter and BN statistic random (no zero-initialised BN), eval mode."""
    import torch  # pylint: disable=import-outside-toplevel
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if 'num_batches_tracked' in name:
                continue
            if name.endswith('running_var'):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith('conv3.bn.weight'):  # BN_o: small updates, as trained blocks make
                tensor.copy_(0.4 * torch.rand(tensor.shape, generator=generator) + 0.2)
            elif name.endswith(('bn.weight', 'bn1.weight', 'bn2.weight')):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(('running_mean', '.bias')):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
            else:  # conv and linear weights: fan-in scaled
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5)
    return model.eval()


def qlnet50(num_classes: int = 1000, seed: int = 0):
    """Their resnet50 (the QLNet architecture), randomised."""
    module = authors_module()
    return randomize(module.resnet50(num_classes=num_classes), seed)


def small_qlnet(seed: int = 0):
    """`SMALL`: their ResNet with the stem, stages, final hardball and head rebuilt at reduced
    widths by their own make_blocks, PDEBlock and hardball (their ResNet fixes the widths)."""
    import torch  # pylint: disable=import-outside-toplevel
    module = authors_module()
    widths, depths = SMALL['widths'], SMALL['depths']
    model = module.ResNet(block=module.PDEBlock, layers=list(depths), num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(widths[0])
    stages, _ = module.make_blocks(module.PDEBlock, list(widths), list(depths), widths[0])
    for name, stage in stages:
        setattr(model, name, stage)
    model.act = module.hardball(radius2=widths[-1])
    model.fc = torch.nn.Linear(widths[-1], SMALL['num_classes'])
    return randomize(model, seed)


def logits(model, images: np.ndarray, dtype: str = 'float32') -> np.ndarray:
    """The model's logits on NHWC `images`, computed in `dtype` by PyTorch."""
    import torch  # pylint: disable=import-outside-toplevel
    torch_dtype = {'float32': torch.float32, 'float64': torch.float64}[dtype]
    model = model.to(torch_dtype)
    with torch.no_grad():
        batch = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(dtype))
        return model(batch).numpy()


def state(model) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def main(output: str) -> None:
    """Writes `output` (.npz, the state_dict's tensors) and `<output>_logits.npz`."""
    model = small_qlnet()
    weights = state(model)
    np.savez(output, **weights)
    images = photos()
    np.savez(output.replace('.npz', '_logits.npz'), float32=logits(model, images),
             float64=logits(model, images, 'float64'))
    print(f'{output}: {len(weights)} tensors, '
          f'{sum(v.size for v in weights.values()):,} numbers')


if __name__ == '__main__':
    main(sys.argv[1])

"""pytorch-fid's own FID InceptionV3 with random weights, and those weights converted by
`convert_inception`: the reference of the InceptionV3 parity test and the t2i test's network.

pytorch-fid builds its network in `fid_inception_v3()` (torchvision's `Inception3` with its
`FIDInceptionA/C/E` blocks) and then loads the published weights from a URL. Nothing may be
downloaded here, so the loader is handed the network's own state after `_randomise`: the network,
its preprocessing (`InceptionV3.forward`: bilinear resize to 299, then 2x - 1) and the state dict's
layout (pytorch-fid's `pt_inception-2015-12-05-*.pth`, with the 1008-way `fc`) are pytorch-fid's.
"""
import os

import numpy as np

_CACHE: dict[str, object] = {}


def _randomise(net, seed: int) -> None:
    """He-normal convolutions and random BatchNorm statistics, so that activations keep their scale
    through the ~90 layers (PyTorch's default init shrinks them towards 0, hiding any mismatch)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def torch_fid_inception(seed: int = 0):
    """(pytorch-fid's `InceptionV3([pool3])` in eval mode, its bare `fid_inception_v3()` network
    whose state dict is a weights file's), both with the same random weights."""
    from unittest import mock

    from pytorch_fid import inception as pytorch_fid

    built, original = [], pytorch_fid._inception_v3

    def build(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    def random_state(*args, **kwargs):  # called once the FID blocks are in place
        _randomise(built[-1], seed)
        return built[-1].state_dict()

    with mock.patch.object(pytorch_fid, "_inception_v3", build), \
            mock.patch.object(pytorch_fid, "load_state_dict_from_url", random_state):
        net = pytorch_fid.InceptionV3([pytorch_fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return net.eval(), built[-1].eval()


def random_inception_weights(tmp_path_factory) -> tuple[object, str]:
    """(pytorch-fid's network, the safetensors file `convert_inception` writes from its saved
    state dict), made once per test session."""
    if "weights" not in _CACHE:
        import torch

        from unclip_jax.convert import inception as convert_inception

        root = tmp_path_factory.mktemp("inception")
        net, bare = torch_fid_inception()
        torch_path = os.path.join(root, "pt_inception-random.pth")
        torch.save(bare.state_dict(), torch_path)
        out = os.path.join(root, "fid_inception.safetensors")
        convert_inception.convert(torch_path, out)
        _CACHE.update(weights=(net, out))
    return _CACHE["weights"]


def torch_features(net, images_uint8: np.ndarray) -> np.ndarray:
    """pytorch-fid's pool3 features of uint8 [N, H, W, 3] images, fed as its fid_score feeds them
    (ToTensor: / 255, NCHW; the network resizes to 299 and maps to [-1, 1])."""
    import torch

    x = torch.from_numpy(images_uint8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        return net(x)[0][:, :, 0, 0].numpy()

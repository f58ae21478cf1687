"""The small backbones of the NPID + SqrtKL paper's model-efficiency rows (Cao & Wu 2024,
arXiv:2404.19289, Tables 1, 3 and 9): MobileNetV2, MobileNetV3 small / large, EfficientNet-b0, from
torchvision, with the 32 px adaptation of common.backbone."""
import torch
import torch.nn as nn
import torchvision
import pytest

import common
import eval_linear
import npid_sqrtkl

pytestmark = pytest.mark.usefixtures("cached_synthetic")  # tests/conftest.py
SMALL = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")
# the paper's parameter counts (Table 9's backbone column, millions: torchvision's whole ImageNet model,
# classifier included; MobileNetV2's is not printed: MobileNetV2 paper, Sandler et al. 2018, Table 4: 3.4M)
PAPER_PARAMS = {"mobilenet_v3_small": 2.5, "mobilenet_v3_large": 5.4, "efficientnet_b0": 5.3, "resnet18": 11.7,
                "mobilenet_v2": 3.4}
EMBED = {"mobilenet_v2": 1280, "mobilenet_v3_small": 576, "mobilenet_v3_large": 960, "efficientnet_b0": 1280}


def _strided(net):
    return [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]


@pytest.mark.parametrize("arch", SMALL + ("resnet18",))
def test_parameter_counts_match_the_papers_table(arch):
    full = getattr(torchvision.models, arch)(weights=None)
    assert abs(sum(p.numel() for p in full.parameters()) / 1e6 - PAPER_PARAMS[arch]) < 0.11


@pytest.mark.parametrize("arch", SMALL)
def test_the_32px_adaptation_keeps_a_4x4_map_and_imagenet_stem_is_torchvisions(arch):
    """cifar stem: the stem conv and the first stride-2 block at stride 1 (downsampling 8, as the CIFAR
    ResNet: 32 px -> 4 x 4); imagenet stem: torchvision's network as it is (224 px -> 7 x 7)."""
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None)
    cifar, imagenet = common.backbone(arch, "cifar").eval(), common.backbone(arch, "imagenet").eval()
    assert cifar.dim == imagenet.dim == EMBED[arch]
    assert len(_strided(cifar)) == len(_strided(tv)) - 2 and len(_strided(imagenet)) == len(_strided(tv)) == 5
    assert sum(p.numel() for p in cifar.parameters()) == sum(p.numel() for p in tv.features.parameters())
    with torch.no_grad():
        assert cifar.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)
        assert imagenet.features(torch.randn(1, 3, 224, 224)).shape[-2:] == (7, 7)
        x = torch.randn(2, 3, 64, 64)
        imagenet.load_state_dict(tv.features.state_dict(), strict=False)  # same weights as torchvision's features
        tv.eval()
        ref = torch.nn.functional.adaptive_avg_pool2d(tv.features(x), 1).flatten(1)  # as torchvision's forward
        assert torch.allclose(imagenet(x), ref, atol=1e-5)  # the embedding is torchvision's pooled features
        assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, EMBED[arch])


def test_efficientnet_has_no_stochastic_depth_so_train_steps_repeat():
    net = common.backbone("efficientnet_b0", "cifar").train()
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    assert torch.equal(a, net(x))  # no random block drops: same batch statistics, same output


@pytest.mark.parametrize("main", [npid_sqrtkl.main, eval_linear.main], ids=["npid_sqrtkl", "eval_linear"])
def test_an_unknown_arch_is_one_line(main, tmp_path, capsys):
    """--arch takes the backbones of common.ARCHS only (common.backbone itself, above the fence, has no
    user-error path: the command line refuses the others)."""
    from cli_util import call
    out = tmp_path / "run"
    argv = (["--ckpt", "random"] if main is eval_linear.main else []) + ["--arch", "vgg11", "--out", str(out)]
    code, _, err = call(main, argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --arch invalid choice: 'vgg11'"), err
    assert all(a in err[0] for a in common.ARCHS) and not out.exists()


TINY = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--out-size", "8", "--workers", "0",
        "--log-every", "1", "--epochs", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", SMALL)
def test_npid_trains_resumes_and_probes_each_small_backbone(arch, tmp_path):
    """The paper's own method on each small backbone: a step, a checkpoint that resumes (the weights
    move on from the saved ones), and a probe whose features have the backbone's embedding size."""
    out = tmp_path / "run"
    npid_sqrtkl.main(TINY + ["--arch", arch, "--max-steps", "1", "--out", str(out)])
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    npid_sqrtkl.main(TINY + ["--arch", arch, "--resume", "--out", str(out)])
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (b["step"], a["step"]) == (1, 2) and a["args"]["arch"] == arch and a["probe"]["arch"] == arch
    assert not torch.equal(a["model"]["projector.0.weight"], b["model"]["projector.0.weight"])
    assert a["model"]["projector.0.weight"].shape == (128, EMBED[arch])
    r = eval_linear.main(["--ckpt", str(out), "--probe", "knn", "--knn-k", "5", "--subset", "64",
                          "--test-subset", "32", "--workers", "0"])
    assert r["dim"] == EMBED[arch] and 0 <= r["knn"]["k5"] <= 100


@pytest.mark.parametrize("method,extra", [("emp_ssl", ["--patches", "2", "--patch-size", "8"]),
                                          ("bag_ssl", ["--loss", "vicreg"]),
                                          ("multiaug_ssl", ["--views", "2"])])
@pytest.mark.slow
def test_every_method_takes_a_small_backbone(method, extra, tmp_path):
    import importlib
    mod = importlib.import_module(method)
    mod.main(TINY + extra + ["--arch", "mobilenet_v3_small", "--max-steps", "1", "--out", str(tmp_path / "r")])
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 1 and ck["probe"]["arch"] == "mobilenet_v3_small"
    assert all(torch.isfinite(v.float()).all() for v in ck["model"].values())


def test_resnet_cifar_stem_is_a_3x3_stride_1_conv_without_bias_and_no_max_pool():
    """The CIFAR ResNet stem (kuangliu/pytorch-cifar, as the four papers' CIFAR code): conv1 3x3, stride 1,
    padding 1, no bias (BatchNorm follows, as after torchvision's 7x7 conv1), no max-pool. Catches a bias added
    (tools/export.py's torchvision model would then not load the weights)."""
    net = common.backbone("resnet18", "cifar")
    c = net.conv1
    assert (c.kernel_size, c.stride, c.padding, c.in_channels, c.out_channels) == ((3, 3), (1, 1), (1, 1), 3, 64)
    assert c.bias is None and isinstance(net.maxpool, nn.Identity)

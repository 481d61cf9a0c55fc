"""``fovea summary``: per-layer counts that agree with the course's formulas, totals that agree with the model.

The formulas (seed 004): a dense layer from n inputs to m units has (n + 1)·m parameters; a k×k convolution
from c_in to c_out channels k·k·c_in·c_out + c_out; its output is ⌊(W − F + 2P)/S⌋ + 1 wide. FLOPs are 2 per
multiply-add: 2·n·m for a dense layer, 2·k·k·(c_in / groups)·c_out per output pixel for a convolution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_subset
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fovea
from fovea.compare import count_flops
from fovea.errors import FoveaError
from fovea.models import create_model, summarize
from fovea.models._summary import Summary


def fovea_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it (as in tests/test_cli.py): a separate process."""
    return subprocess.run([sys.executable, "-m", "fovea.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def by_name(s: Summary) -> dict[str, Any]:
    return {layer.name: layer for layer in s.layers}


def out_size(w: int, f: int, p: int, s: int) -> int:
    return (w - f + 2 * p) // s + 1


def test_dense_layers_have_n_plus_one_times_m_parameters() -> None:
    # The course's example: a 224x224x3 image flattened (150,528 values) into 512, 128 and 1 units. Built on
    # the meta device: 77 M parameters with no memory behind them, counted all the same.
    with torch.device("meta"):
        net = nn.Sequential(nn.Flatten(), nn.Linear(150_528, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU(),
                            nn.Linear(128, 1))
    s = summarize(net, image_size=224)
    layers = by_name(s)
    assert [layers[k].parameters for k in ("1", "3", "5")] == [77_070_848, 65_664, 129]
    assert s.parameters == 77_136_641 == sum(p.numel() for p in net.parameters())
    assert [layers[k].output_shape for k in ("0", "1", "3", "5")] == [[1, 150_528], [1, 512], [1, 128], [1, 1]]
    assert [layers[k].flops for k in ("1", "3", "5")] == [2 * 150_528 * 512, 2 * 512 * 128, 2 * 128]
    assert s.flops == 2 * (150_528 * 512 + 512 * 128 + 128)


@pytest.mark.parametrize(("k", "stride", "padding", "size"), [
    (3, 1, 0, 32), (3, 1, 1, 32), (5, 2, 2, 33), (7, 2, 3, 224), (3, 2, 0, 31), (4, 3, 1, 20), (1, 1, 0, 17),
])
def test_conv_parameters_flops_and_output_size(k: int, stride: int, padding: int, size: int) -> None:
    # A second conv from 8 to 16 channels, so that c_in is not always the image's 3.
    net = nn.Sequential(nn.Conv2d(3, 8, k, stride, padding), nn.Conv2d(8, 16, k, stride, padding, bias=False))
    if out_size(out_size(size, k, padding, stride), k, padding, stride) < 1:
        pytest.skip("the second conv has nothing left to slide over")
    layers = by_name(summarize(net, image_size=size))
    w1 = out_size(size, k, padding, stride)
    w2 = out_size(w1, k, padding, stride)
    assert layers["0"].parameters == k * k * 3 * 8 + 8
    assert layers["1"].parameters == k * k * 8 * 16  # no bias
    assert layers["0"].output_shape == [1, 8, w1, w1]
    assert layers["1"].output_shape == [1, 16, w2, w2]
    assert layers["0"].flops == 2 * k * k * 3 * 8 * w1 * w1
    assert layers["1"].flops == 2 * k * k * 8 * 16 * w2 * w2


def test_depthwise_separable_conv_has_286_parameters_against_1792() -> None:
    plain = summarize(nn.Conv2d(3, 64, 3, padding=1), image_size=224)
    separable = summarize(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 64, 1)), image_size=224)
    layers = by_name(separable)
    assert plain.parameters == 3 * 3 * 3 * 64 + 64 == 1_792
    assert layers["0"].parameters == 3 * 3 * 1 * 3 + 3 == 30  # depthwise: one 3x3 filter per channel
    assert layers["1"].parameters == 1 * 1 * 3 * 64 + 64 == 256  # pointwise
    assert separable.parameters == 286
    assert plain.output_shape == separable.output_shape == [1, 64, 224, 224]
    assert layers["0"].flops == 2 * 3 * 3 * 1 * 3 * 224 * 224
    assert layers["1"].flops == 2 * 3 * 64 * 224 * 224
    assert plain.flops == 2 * 3 * 3 * 3 * 64 * 224 * 224 > 6 * separable.flops


class _Reused(nn.Module):
    """A container, a layer called twice and a weight shared by two layers: what must not count twice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4, bias=False)
        self.out.weight = self.fc.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x).mean((2, 3))  # (1, 4)
        return self.out(self.fc(self.fc(x)))


def test_containers_repeated_calls_and_shared_weights_count_once() -> None:
    net = _Reused()
    s = summarize(net, image_size=8)
    layers = by_name(s)
    assert layers["fc"].calls == 2 and layers["fc"].parameters == 4 * 4 + 4
    assert layers["fc"].flops == 2 * (2 * 4 * 4)  # both calls
    assert layers["out"].parameters == 0  # its weight is fc's, counted there
    assert layers["body"].parameters == 0 and layers["body"].flops == 0  # a container holds nothing of its own
    assert s.parameters == sum(p.numel() for p in net.parameters()) == (3 * 3 * 3 * 4 + 4) + (4 * 4 + 4)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, 3, 8, 8))
    assert s.flops == counter.get_total_flops() == 2 * 3 * 3 * 3 * 4 * 64 + 3 * (2 * 4 * 4)


@pytest.fixture(scope="module")
def resnet18() -> Summary:
    return summarize("resnet18")


def test_resnet18_has_its_published_11_7_million_parameters(resnet18: Summary) -> None:
    assert (resnet18.image_size, resnet18.num_classes, resnet18.source) == (224, 1000, "timm")
    assert resnet18.parameters == 11_689_512 == resnet18.trainable_parameters
    assert resnet18.param_bytes == 4 * 11_689_512  # float32
    conv1 = by_name(resnet18)["conv1"]  # 7x7, stride 2, padding 3, 3 -> 64, no bias
    assert conv1.parameters == 7 * 7 * 3 * 64
    assert conv1.output_shape == [1, 64, out_size(224, 7, 3, 2), out_size(224, 7, 3, 2)] == [1, 64, 112, 112]
    assert resnet18.flops == 3_628_146_688  # 1.81 G multiply-adds, the published figure
    assert resnet18.output_shape == [1, 1000]


@pytest.mark.parametrize("depth", [0, 1, 2, None])
def test_depth_folds_layers_into_their_parent_and_keeps_the_totals(resnet18: Summary, depth: int | None) -> None:
    rows = resnet18.at_depth(depth)
    assert sum(r.parameters for r in rows) == 11_689_512
    assert sum(r.flops for r in rows) == resnet18.flops
    if depth is not None:
        assert max(r.depth for r in rows) == depth
    if depth == 1:
        layer1 = next(r for r in rows if r.name == "layer1")
        assert layer1.parameters == 4 * (3 * 3 * 64 * 64 + 2 * 64)  # four 3x3 convs and their batch norms
    if depth == 0:
        assert [r.name for r in rows] == [""]


def test_attention_is_counted_on_the_cpu() -> None:
    # timm's test_vit: 160 px by default (its pretrained_cfg), 16 px patches -> 100 tokens + the class token,
    # 2 heads of 32. torch 2.11 has no FLOP formula for the CPU's attention kernel; Fovea adds torch's own.
    s = summarize("test_vit")
    assert s.image_size == 160
    attn = by_name(s)["blocks.0.attn"]
    tokens, heads, head_dim = 101, 2, 32
    assert attn.flops == 2 * (2 * heads * tokens * tokens * head_dim)  # q·kᵀ and scores·v; qkv, proj are below it


@pytest.mark.parametrize(("name", "size", "classes"), [("cnn", 64, 2), ("mlp", 32, 2), ("alexnet", 224, 1000)])
def test_default_image_size_and_classes(name: str, size: int, classes: int) -> None:
    s = summarize(name)
    assert (s.image_size, s.num_classes, s.output_shape) == (size, classes, [1, classes])
    assert s.input_shape == [1, 3, size, size]


def test_wrong_input_is_a_fovea_error(tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="Did you mean: resnet18"):
        summarize("resnet81")
    with pytest.raises(FoveaError, match="not a Fovea model"):
        summarize(tmp_path)  # a folder, but not a run
    with pytest.raises(FoveaError, match="no such run folder"):
        summarize(str(tmp_path / "runs" / "missing"))
    with pytest.raises(FoveaError, match="cannot take a 64x64 px image"):
        summarize(create_model("mlp", 2, image_size=32), image_size=64)  # built for 32 px: 3,072 inputs
    with pytest.raises(FoveaError, match="--depth"):
        summarize("cnn").at_depth(-1)
    with pytest.raises(FoveaError, match="--image-size"):
        summarize("cnn", image_size=0)


@pytest.fixture(scope="module")
def run(pets_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_subset(tmp_path_factory.mktemp("summary_pets"), 8, 4, pets_root)
    with pytest.MonkeyPatch.context() as mp:  # the autouse FOVEA_HOME fixture is per test; this runs once
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("summary_home")))
        return fovea.train(data, model="cnn", image_size=32, epochs=1, progress=False,
                           out=str(tmp_path_factory.mktemp("summary_run") / "run"), extra={"widths": (8, 16, 32, 64)})


def test_a_run_folder_is_summarized_at_its_own_size(run: Path) -> None:
    s = summarize(run)
    net = fovea.load(run, device="cpu").net
    assert (s.source, s.image_size, s.num_classes, s.output_shape) == ("run", 32, 2, [1, 2])
    assert s.parameters == sum(p.numel() for p in net.parameters())
    assert s.flops == count_flops(net, 32)  # what fovea compare reports
    stem = by_name(s)["stem.0"]  # 3x3, stride 2, padding 1, 3 -> 8, no bias (batch norm follows)
    assert stem.parameters == 3 * 3 * 3 * 8
    assert stem.output_shape == [1, 8, out_size(32, 3, 1, 2), out_size(32, 3, 1, 2)] == [1, 8, 16, 16]
    assert by_name(s)["head"].parameters == (2 * 64 + 1) * 2  # mean and max pooled features -> 2 classes
    with pytest.raises(FoveaError, match="has 2 classes"):
        summarize(run, num_classes=10)


def test_cli_run_folder_json(run: Path) -> None:
    done = fovea_cli("summary", str(run), "--json", "--depth", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    d = json.loads(done.stdout)  # the whole of stdout is one JSON object
    net = fovea.load(run, device="cpu").net
    total = sum(p.numel() for p in net.parameters())
    assert d["totals"]["parameters"] == total and d["image_size"] == 32 and d["num_classes"] == 2
    assert [r["name"] for r in d["layers"]] == ["", "stem", "stages", "drop", "head"]
    assert sum(r["parameters"] for r in d["layers"]) == total
    assert sum(r["flops"] for r in d["layers"]) == d["totals"]["flops"] == count_flops(net, 32)


def test_cli_resnet18_prints_its_parameter_count() -> None:
    done = fovea_cli("summary", "resnet18")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "11,689,512" in done.stdout
    assert "3.63 GFLOPs per image at 224x224 px" in done.stdout
    assert "layer4.1.conv2" in done.stdout and "[1, 512, 7, 7]" in done.stdout


def test_help_shows_an_architecture_summarised_without_a_run() -> None:
    # The architecture, before any training: --help's example runs as written, with no run folder anywhere.
    shown = fovea_cli("summary", "--help")
    assert shown.returncode == 0, shown.stderr
    example = next(line.split("#")[0].split() for line in shown.stdout.splitlines()
                   if line.strip().startswith("fovea summary cnn "))
    done = fovea_cli(*example[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    s = summarize("cnn", image_size=int(example[example.index("--image-size") + 1]))
    assert f"cnn: {s.image_size}x{s.image_size} px, 2 classes" in done.stdout
    assert f"parameters {s.parameters:,}" in done.stdout


@pytest.mark.parametrize("args", [["resnet81"], ["NOT_A_RUN"]])
def test_cli_bad_input_is_one_error_line(args: list[str], tmp_path: Path) -> None:
    args = [str(tmp_path) if a == "NOT_A_RUN" else a for a in args]  # an existing folder without model.json
    done = fovea_cli("summary", *args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr


def test_arch_options_rebuild_a_runs_network_by_name(run: Path) -> None:
    """`fovea summary cnn --arch widths=...` at the run's size counts what the run folder holds (it was trained with
    those widths); --arch on a run folder, or a key the architecture does not take, is one error line."""
    done = fovea_cli("summary", "cnn", "--image-size", "32", "--arch", "widths=8,16,32,64", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    by_name, of_run = json.loads(done.stdout), summarize(run)
    assert (by_name["totals"]["parameters"], by_name["totals"]["flops"]) == (of_run.parameters, of_run.flops)
    assert by_name["totals"]["parameters"] != summarize("cnn", image_size=32).parameters  # the default widths differ
    for args, says in ((["cnn", "--arch", "nonsense=3"], "nonsense"), ([str(run), "--arch", "widths=8,16"], "--arch")):
        bad = fovea_cli("summary", *args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr + bad.stdout, bad.stderr
        assert bad.stderr.strip().startswith("error:") and says in bad.stderr, bad.stderr

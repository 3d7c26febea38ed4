"""The way back to torch: a plan SPA makes on the ONNX export of a torch module, applied to
that module with ``converters.torch.apply_plan``, gives the function of SPA's pruned graph.

Every zoo architecture x both exporters, in map-back mode (``keep_bn=True``; exports cached
in .cache/zoo/<name>.<exporter>.mapback.onnx): prune at ratio 0.5, apply the plan to a fresh
module, run it and SPA's pruned ONNX (ONNX Runtime) on the same random input:
max |torch - onnx| <= 1e-5 * max |onnx|. Pairs that do not map back are listed below with
the reason (docs/frameworks.md has the same table).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import spa  # noqa: E402
from converters.torch import (MapBackError, apply_plan, example_inputs,  # noqa: E402
                              export, load_factory, load_module, parse_input_shape)
from models.export import export_zoo_entry  # noqa: E402
from models.registry import TORCH_ZOO  # noqa: E402
from models.torch_zoo import ZOO, make  # noqa: E402
from spa.errors import UsageError  # noqa: E402
from spa.plan import Plan  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-5
RATIO = 0.5

# The module's own code fixes a width that the ONNX graph leaves free: no plan-to-module
# mapping can fix that (strict xfails; test_restricted_plan_maps_back shows what does map).
_CHUNK = ("C2f splits cv1's output with chunk(2), which always cuts two equal halves; the "
          "ONNX Split has static sizes, so SPA prunes the two halves by different amounts")
TORCH_CODE_LIMITS = {
    ("yolo_c2f_small", "dynamo"): _CHUNK,
    ("yolo_c2f_small", "legacy"): _CHUNK,
    ("gpt_gqa_tiny", "legacy"):
        "the legacy export computes the K/V expand in ways that keep the kv heads frozen, so "
        "SPA prunes V's head dim on its own; the module uses one head_dim for K and V",
    ("vit_qkv", "dynamo"):
        "QKVAttention reshapes the attention output to the input's width (reshape(b, n, d) "
        "with d = x.shape[-1]); SPA prunes the residual stream and the heads separately",
}
# (The SPA rewrite bugs these exports exposed -- Resize scales treated as channels, scalar
# shape literals written back as 1-D -- are fixed; hrnet/bert/gpt legacy now map back.)
SPA_LIMITS: dict = {}


def _cases():
    for spec in TORCH_ZOO:
        for exporter in ("dynamo", "legacy"):
            key = (spec.name, exporter)
            marks = []
            if key in TORCH_CODE_LIMITS:
                marks = [pytest.mark.xfail(reason=TORCH_CODE_LIMITS[key], strict=True,
                                           raises=MapBackError)]
            elif key in SPA_LIMITS:
                marks = [pytest.mark.xfail(reason=SPA_LIMITS[key], strict=False)]
            yield pytest.param(spec.name, exporter, marks=marks, id=f"{spec.name}-{exporter}")


_CACHE: dict = {}


def _pruned(name: str, exporter: str, ratio: float = RATIO):
    """(loaded ONNX model, PruneResult) for a zoo model's map-back export, memoised."""
    key = (name, exporter, ratio)
    if key not in _CACHE:
        path = export_zoo_entry(name, exporter=exporter, keep_bn=True)
        model = spa.load(str(path))
        # exact counts: the map-back is under test, not the default widths (round_to auto)
        _CACHE[key] = (model, spa.prune(model, ratio=ratio, seed=1, round_to=1))
    return _CACHE[key]


def _run_onnx(proto, xs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})[0]


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name, exporter", list(_cases()))
def test_zoo_plan_maps_back(name, exporter):
    model, res = _pruned(name, exporter)
    assert res.plan.keep, "nothing was pruned"
    module = make(name)
    xs = ZOO[name].example_inputs(batch=3, seed=7)
    report = apply_plan(module, model, res.plan, example_inputs=xs)
    assert report["tensors"], "no parameter was shrunk"
    # every parameter that has an initializer now has the pruned initializer's shape
    pruned = {t.name: tuple(t.dims) for t in res.proto.graph.initializer}
    for n, p in list(module.named_parameters()) + list(module.named_buffers()):
        if n in pruned:
            assert tuple(p.shape) == pruned[n], n
    with torch.no_grad():
        y = module(*xs).numpy()
    err = _rel_err(y, _run_onnx(res.proto, xs))
    assert err <= RTOL, f"shrunk module differs from SPA's pruned graph by {err:.3g}"


def _without(plan: Plan, drop) -> Plan:
    keep = {g: ks for g, ks in plan.keep.items() if g not in drop}
    return Plan(keep, {g: plan.sizes[g] for g in keep}, plan.criterion, plan.options,
                plan.model_sha256)


def test_restricted_plan_maps_back():
    """The TORCH_CODE_LIMITS models map back once the plan leaves alone the groups that
    their code fixes: vit_qkv without the residual stream and heads, yolo without the
    groups that are cut by a Split (chunk)."""
    # vit_qkv: only exact, non-head groups (the MLP hidden units)
    model, res = _pruned("vit_qkv", "dynamo")
    drop = {g.id for g in res.analysis.groups if g.kind == "heads" or not g.exact}
    plan = _without(res.plan, drop)
    assert plan.keep and drop
    xs = ZOO["vit_qkv"].example_inputs(batch=2, seed=3)
    apply_plan(make("vit_qkv"), model, plan, example_inputs=xs)
    # yolo: groups whose activations are split by a Split node keep all channels
    model, res = _pruned("yolo_c2f_small", "dynamo")
    split_in = {n.input[0] for n in model.graph.node if n.op_type == "Split"}
    drop = {g.id for g in res.analysis.groups
            if any(m["tensor"] in split_in for m in g.members)}
    plan = _without(res.plan, drop)
    assert plan.keep and drop
    xs = ZOO["yolo_c2f_small"].example_inputs(batch=2, seed=3)
    module = make("yolo_c2f_small")
    c2f = [n for n, m in module.named_modules() if type(m).__name__ == "C2f"]
    # C2f.c (the chunk width) is only used in __init__; its value is ambiguous here, so say
    # it stays (the split groups are untouched)
    with pytest.raises(MapBackError, match=r"attributes=\{'b2.c'"):
        apply_plan(module, model, plan)
    apply_plan(module, model, plan, example_inputs=xs,
               attributes={f"{n}.c": None for n in c2f})
    assert module.b2.c == 16 and module.b2.m[0].cv1[0].out_channels < 16


def _shapes(module):
    return {n: tuple(t.shape) for n, t in module.state_dict().items()}


def test_code_limits_are_refused_and_leave_module_unchanged():
    """bert_tiny maps back at ratio 0.5 only because the heads and the hidden size shrink
    alike (its attention reshapes to the input width); at 0.3 they do not, the forward
    check says so, and the module is rolled back. Likewise for nn.MultiheadAttention, whose
    widths are tied by the module itself."""
    model, res = _pruned("bert_tiny", "dynamo", ratio=0.3)
    module = make("bert_tiny")
    before = _shapes(module)
    attrs = (module.layers[0].attn.heads, module.layers[0].attn.query.out_features)
    with pytest.raises(MapBackError, match="forward fails"):
        apply_plan(module, model, res.plan, example_inputs=ZOO["bert_tiny"].example_inputs(2))
    assert _shapes(module) == before
    assert (module.layers[0].attn.heads, module.layers[0].attn.query.out_features) == attrs
    # nn.MultiheadAttention ties its input width to its attention width: at 0.5 both halve
    # (vit_mha maps back), at 0.3 they do not, and apply_plan refuses by name
    model, res = _pruned("vit_mha", "dynamo", ratio=0.3)
    module = make("vit_mha")
    with pytest.raises(MapBackError, match=r"'blocks.0.attn' \(MultiheadAttention\).*equal"):
        apply_plan(module, model, res.plan)
    assert module.blocks[0].attn.embed_dim == 64
    # yolo (chunk into unequal halves): the attribute inference already refuses, by name
    model, res = _pruned("yolo_c2f_small", "dynamo")
    with pytest.raises(MapBackError, match=r"'b2' \(C2f\).*'c'"):
        apply_plan(make("yolo_c2f_small"), model, res.plan)


def test_deployment_export_does_not_map_back():
    """With BN folded into the convs (keep_bn=False, the zoo's deployment export) the plan
    cannot be carried over, and the error says what to do."""
    path = export_zoo_entry("resnet20", exporter="legacy")
    model = spa.load(str(path))
    res = spa.prune(model, ratio=0.5, seed=1)
    module = make("resnet20")
    before = _shapes(module)
    with pytest.raises(MapBackError, match="keep_bn=True"):
        apply_plan(module, model, res.plan)
    assert _shapes(module) == before


def test_tied_weights_stay_tied_and_attributes_follow():
    model, res = _pruned("gpt_gqa_tiny", "dynamo")
    module = make("gpt_gqa_tiny")
    report = apply_plan(module, model, res.plan)
    assert module.lm_head.weight is module.embed.weight
    attn = module.blocks[0].attn
    assert attn.n_heads == attn.q_proj.out_features // attn.head_dim
    assert attn.n_kv == attn.k_proj.out_features // attn.head_dim
    assert attn.n_rep == attn.n_heads // attn.n_kv
    assert "blocks.0.attn.n_heads" in report["attributes"]


def test_depthwise_and_transposed_convs():
    model, res = _pruned("mobilenetv2_small", "dynamo")
    module = make("mobilenetv2_small")
    apply_plan(module, model, res.plan)
    dw = module.features[2].conv[1][0]            # a depthwise conv
    assert dw.groups == dw.in_channels == dw.out_channels == dw.weight.shape[0] < 96
    model, res = _pruned("unet_small", "dynamo")
    module = make("unet_small")
    apply_plan(module, model, res.plan)
    up = module.ups[0]
    assert (up.in_channels, up.out_channels) == (up.weight.shape[0], up.weight.shape[1])
    assert up.out_channels < 64


def test_fine_tune_after_map_back(tmp_path):
    """The shrunk module trains: optimizer built after apply_plan, gradients have the new
    shapes, BN running statistics update, and it exports again."""
    model, res = _pruned("resnet20", "legacy")
    module = make("resnet20")
    apply_plan(module, model, res.plan)
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    module.train()
    xs = ZOO["resnet20"].example_inputs(batch=4, seed=1)
    target = torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(module(*xs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in module.parameters():
        assert p.grad is not None and p.grad.shape == p.shape
    assert np.isfinite(loss.item())
    out = export(module, xs, tmp_path / "small.onnx", exporter="legacy", keep_bn=False)
    assert module.training                           # export leaves the mode it found...
    module.eval()
    export(module, xs, tmp_path / "small2.onnx", exporter="legacy")
    assert not module.training                       # ...whichever it was
    assert spa.stats(spa.load(str(out)))["params"] < res.before["params"]


class _TwoBranches(torch.nn.Module):
    """An integer attribute (`width`) that both branches' widths used to equal."""

    def __init__(self):
        super().__init__()
        self.width = 8
        self.a = torch.nn.Conv2d(3, 8, 1)
        self.b = torch.nn.Conv2d(3, 8, 1)
        self.c = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def _two():
    torch.manual_seed(0)
    return _TwoBranches().eval()


def test_ambiguous_attribute_is_refused_by_name(tmp_path):
    module = _two()
    path = export(module, torch.randn(2, 3, 4, 4), tmp_path / "two.onnx", exporter="legacy")
    model = spa.load(str(path))
    ana = spa.analyze(model)
    assert [g.channels for g in ana.groups] == [16]      # a | b, joined by the Concat
    plan = Plan({0: [0, 1, 2, 3, 8, 9, 10, 11, 12, 13]}, {0: 16})
    with pytest.raises(MapBackError, match=r"'<root>' \(_TwoBranches\).*'width'.*\[4, 6\]"):
        apply_plan(module, model, plan)
    assert module.a.weight.shape[0] == 8                   # rolled back
    apply_plan(module, model, plan, attributes={"width": None})
    assert module.width == 8 and module.c.in_channels == 10
    module = _two()
    # the same cut on both branches is unambiguous; the plan may also come as a file
    plan = Plan({0: [0, 1, 2, 3, 9, 10, 11, 12]}, {0: 16})
    (tmp_path / "plan.json").write_text(plan.dumps())
    x = torch.randn(2, 3, 4, 4)
    report = apply_plan(module, str(path), str(tmp_path / "plan.json"), example_inputs=x)
    assert module.width == 4 and report["attributes"]["width"] == [8, 4]
    assert module.c.in_channels == 8


def test_plan_for_another_model_is_refused(tmp_path):
    module = _two()
    path = export(module, torch.randn(2, 3, 4, 4), tmp_path / "two.onnx", exporter="legacy")
    model, res = _pruned("plain_cnn", "legacy")
    with pytest.raises(spa.PlanError):
        apply_plan(module, str(path), res.plan)
    with pytest.raises(MapBackError, match="no initializer"):
        apply_plan(make("plain_cnn"), str(path), Plan({0: [0, 1, 2, 3, 8, 9, 10, 11]}, {0: 16}))


# --------------------------------------------------------------------------- CLI helpers


def test_parse_input_shape():
    assert parse_input_shape("1x3x32x32") == [((1, 3, 32, 32), "float32")]
    assert parse_input_shape("2x16:int64, 2x16") == [((2, 16), "int64"), ((2, 16), "float32")]
    for bad in ("1x3x", "1xax3", "0x3", "1x3:complex"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)
    xs = example_inputs(parse_input_shape("1x3x8x8,1x5:int64"))
    assert xs[0].shape == (2, 3, 8, 8) and xs[1].dtype == torch.int64   # batch 1 traced as 2


def test_load_factory_and_state_dict(tmp_path):
    from models.torch_zoo import PlainCNN
    assert load_factory("models.torch_zoo:PlainCNN") is PlainCNN
    with pytest.raises(UsageError, match="package.module:factory"):
        load_factory("models.torch_zoo")
    with pytest.raises(UsageError, match="cannot import"):
        load_factory("no_such_pkg_xyz:f")
    with pytest.raises(UsageError, match="no attribute"):
        load_factory("models.torch_zoo:NoSuch")
    ref = make("plain_cnn")
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    m = load_module("models.torch_zoo:PlainCNN", str(tmp_path / "w.pt"))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 ref.state_dict().values()))
    torch.save({"fc1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(spa.SpaError, match="does not fit"):
        load_module("models.torch_zoo:PlainCNN", str(tmp_path / "bad.pt"))


# --------------------------------------------------------------------------- docs


def test_docs_example_runs(tmp_path):
    """The python example in docs/frameworks.md runs as written."""
    text = (REPO / "docs" / "frameworks.md").read_text()
    block = re.search(r"<!-- example:torch -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/frameworks.md lost its torch example"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "small.onnx").is_file()
    json.loads((tmp_path / "plan.json").read_text())


def test_cli_convert(tmp_path):
    import onnx

    from spa.cli import main

    out = tmp_path / "m.onnx"
    base = ["convert", "torch", "models.torch_zoo:PlainCNN", "--input-shape", "1x3x32x32",
            "--exporter", "legacy", "-o"]
    assert main(base + [str(out)]) == 0
    proto = onnx.load(str(out))
    assert {"features.0.0.weight", "features.0.1.weight"} <= {t.name for t in
                                                              proto.graph.initializer}
    assert "BatchNormalization" in {n.op_type for n in proto.graph.node}
    assert main(base + [str(tmp_path / "d.onnx"), "--fold-bn"]) == 0
    proto = onnx.load(str(tmp_path / "d.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    bad = tmp_path / "bad.onnx"
    assert main(["convert", "torch", "models.torch_zoo:NoSuch", "--input-shape", "1x3x32x32",
                 "-o", str(bad)]) == 2
    assert main(base[:-1] + ["-o", str(bad), "--state-dict", str(tmp_path / "none.pt")]) == 2
    assert not bad.exists()


class _Norms(torch.nn.Module):
    """Layers the zoo lacks: GroupNorm (SPA prunes whole groups), PReLU, InstanceNorm,
    grouped ConvTranspose, Conv1d."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.gn, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), \
            nn.PReLU(16)
        self.c2, self.inorm = nn.Conv2d(16, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True)
        self.up, self.c3 = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=2), nn.Conv1d(8, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.up(self.inorm(self.c2(self.act(self.gn(self.c1(x))))))
        return self.fc(self.c3(y.flatten(2)).mean(-1))


def test_group_norm_loses_whole_groups(tmp_path):
    torch.manual_seed(0)
    module = _Norms().eval()
    x = torch.randn(2, 3, 8, 8)
    path = export(module, (x,), tmp_path / "norms.onnx")
    model = spa.load(str(path))
    res = spa.prune(model, ratio=0.5)
    report = apply_plan(module, model, res.plan, example_inputs=(x,))
    assert report["attributes"]["gn.num_groups"] == [4, 2]
    assert module.gn.num_channels == module.act.num_parameters == module.c2.in_channels == 8

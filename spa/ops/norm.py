"""Normalisations. Per-channel ones (BatchNorm, InstanceNorm) are exact; ones that
normalise over the channel axis (LayerNorm, GroupNorm) make their group approximate."""
from __future__ import annotations

from .common import norm_axis, same, touch
from .registry import rule


def _scale(n, c) -> None:
    """Input 1 of a normalisation is its per-channel scale γ (criterion bn_scale)."""
    t = n.i(1)
    if t:
        for k in range(n.rank(t) or 0):
            c.tag((t, k), "norm_scale")


@rule("BatchNormalization")
def batch_norm(n, c):
    """BatchNormalization: scale, bias, mean and var follow the channel axis (exact)."""
    x, y = n.i(0), n.o(0)
    same(n, c, x, y)
    for t in n.inputs[1:5]:
        if t:
            c.couple((t, 0), (x, 1))
            c.role((t, 0), "norm")
    _scale(n, c)
    for t in n.outputs[1:]:
        if t:
            c.freeze((t, 0), "training-mode BatchNormalization statistics")


@rule("InstanceNormalization")
def instance_norm(n, c):
    """InstanceNormalization: normalises each channel over space; scale/bias per channel."""
    x, y = n.i(0), n.o(0)
    same(n, c, x, y)
    for t in n.inputs[1:3]:
        if t:
            c.couple((t, 0), (x, 1))
            c.role((t, 0), "norm")
    _scale(n, c)


@rule("LayerNormalization")
def layer_norm(n, c):
    """LayerNormalization: normalised axes couple with scale/bias; the group is approximate."""
    x, y = n.i(0), n.o(0)
    r = n.rank(x)
    axis = norm_axis(n.attr("axis", -1), r)
    same(n, c, x, y)
    for t in n.inputs[1:3]:
        if t:
            rt = n.rank(t)
            for k in range(rt):
                c.couple((t, k), (x, r - rt + k))
                c.role((t, k), "norm")
    _scale(n, c)
    for k in range(axis, r):
        c.approximate((x, k), "LayerNormalization normalises over this axis")
    for t in n.outputs[1:]:  # mean / inv_std_dev: the normalised axes have length 1
        if t:
            for k in range(min(axis, n.rank(t) or 0)):
                c.couple((t, k), (x, k))
            touch(c, t)


@rule("RMSNormalization")
def rms_norm(n, c):
    """RMSNormalization (opset 23): like LayerNormalization without the mean."""
    layer_norm(n, c)


@rule("GroupNormalization")
def group_norm(n, c):
    """GroupNormalization: channel = (group, channel-in-group); groups are kept and every
    group loses the same channels; approximate (statistics over the channels of a group)."""
    x, y = n.i(0), n.o(0)
    same(n, c, x, y)
    g = n.attr("num_groups")
    cn = n.shape(x)[1]
    groups = c.virtual("groups", g)
    c.freeze(groups, "GroupNormalization keeps its groups")
    c.product((x, 1), [groups, c.virtual("per_group", cn // g)], policy="all")
    for t in n.inputs[1:3]:
        if t:
            if n.shape(t)[0] == cn:
                c.couple((t, 0), (x, 1))
            else:
                c.couple((t, 0), groups)
            c.role((t, 0), "norm")
    _scale(n, c)
    c.approximate((x, 1), "GroupNormalization normalises over the channels of each group")

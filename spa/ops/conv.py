"""Convolutions: input and output channels are independent dims joined through the weight.

Grouped convolutions are products: input channel = (group, channel-in-group). Depthwise
convolutions prune whole groups (their `group` attribute shrinks); other grouped
convolutions keep their groups and lose the same channels in every group.
"""
from __future__ import annotations

from .common import freeze_axes, prod
from .registry import rule


def _spatial(n, c, x, w, y):
    r = n.rank(x) or 0
    freeze_axes(n, c, x, range(2, r), "spatial axis", structural=True)
    freeze_axes(n, c, y, range(2, n.rank(y) or 0), "spatial axis", structural=True)
    freeze_axes(n, c, w, range(2, n.rank(w) or 0), "kernel axis", structural=True)
    c.couple((x, 0), (y, 0))


def _conv_shrink(n, s):
    g = n.attr("group", 1)
    if g == 1:
        return
    x, w = n.i(0), n.i(1)
    cin_g = n.shape(w)[1] if n.op == "Conv" else None
    if n.op == "Conv" and cin_g == 1:
        s.set_attr(n, "group", s.new_len((x, 1)))
    elif n.op == "ConvTranspose":
        s.set_attr(n, "group", s.new_len((x, 1)))


def _conv_macs(n, shapes):
    y, w = shapes.get(n.o(0)), shapes.get(n.i(1))
    return prod(y[1:]) * prod(w[1:]) if y and w else 0


def _convt_macs(n, shapes):
    x, w = shapes.get(n.i(0)), shapes.get(n.i(1))
    return prod(x[1:]) * prod(w[1:]) if x and w else 0


@rule("Conv", shrink=_conv_shrink, macs=_conv_macs)
def conv(n, c):
    """Conv: in-channels ↔ weight axis 1, out-channels ↔ weight axis 0 and bias."""
    x, w, b, y = n.i(0), n.i(1), n.i(2), n.o(0)
    _spatial(n, c, x, w, y)
    g = n.attr("group", 1)
    sw = n.shape(w)
    cout = n.shape(y)[1]
    c.couple((w, 0), (y, 1))
    c.role((w, 0), "out")
    c.role((w, 1), "in")
    # ONNX Runtime's CPU convolutions take the blocked NCHWc layout only when the channel
    # counts are multiples of the vector width (docs/speed.md, "Default widths")
    c.tag((w, 0), "channel_block")
    c.tag((w, 1), "channel_block")
    if b:
        c.couple((b, 0), (y, 1))
        c.role((b, 0), "bias")
    if g == 1:
        c.couple((x, 1), (w, 1))
        return
    cin_g, cout_g = sw[1], cout // g if isinstance(cout, int) else None
    if cin_g == 1 and cout_g == 1:          # depthwise
        c.couple((x, 1), (y, 1))
    elif cin_g == 1:                         # depthwise with a channel multiplier
        per = c.virtual("per_group_out", cout_g)
        c.freeze(per, "channel multiplier of a depthwise convolution")
        c.product((y, 1), [(x, 1), per])
    else:                                    # grouped: equal counts per group
        groups = c.virtual("groups", g)
        c.freeze(groups, "grouped convolution keeps its groups (channels are pruned equally "
                 "in every group)")
        c.product((x, 1), [groups, (w, 1)], policy="all")
        c.product((y, 1), [groups, c.virtual("per_group_out", cout_g)], policy="all")


@rule("ConvTranspose", shrink=_conv_shrink, macs=_convt_macs)
def conv_transpose(n, c):
    """ConvTranspose: in-channels ↔ weight axis 0, out-channels ↔ weight axis 1 and bias."""
    x, w, b, y = n.i(0), n.i(1), n.i(2), n.o(0)
    _spatial(n, c, x, w, y)
    g = n.attr("group", 1)
    c.couple((x, 1), (w, 0))
    c.role((w, 0), "in")
    c.role((w, 1), "out")
    if b:
        c.role((b, 0), "bias")
    if g == 1:
        c.couple((w, 1), (y, 1))
        if b:
            c.couple((b, 0), (y, 1))
    elif n.shape(w)[1] == 1 and n.shape(x)[1] == g:   # depthwise
        c.couple((x, 1), (y, 1))
        if b:
            c.couple((b, 0), (y, 1))
    else:
        for t, k in ((x, 1), (y, 1), (w, 1)):
            c.freeze((t, k), "grouped ConvTranspose is not pruned")
        if b:
            c.freeze((b, 0), "grouped ConvTranspose is not pruned")

"""Mixers: one module per method, all built on `LinearizedAttention`; `MIXERS` maps each
method of `linearize.methods.REGISTRY` to its attention layer."""
from ..state import NEW_PARAMETER_PREFIX
from .base import AttentionTransfer, LinearizedAttention
from .based import BasedAttention
from .deltanet import GatedDeltaNetAttention
from .lightning import LightningAttention
from .liger import LigerGLAAttention, LigerHGRN2Attention
from .lizard import LizardAttention
from .lolcats import LolcatsAttention
from .window_sinks import WindowSinksAttention

MIXERS: dict[str, type[LinearizedAttention]] = {
    cls.method.name: cls
    for cls in (LigerGLAAttention, LigerHGRN2Attention, LizardAttention, LolcatsAttention, GatedDeltaNetAttention,
                LightningAttention, BasedAttention, WindowSinksAttention)
}

__all__ = ["MIXERS", "LinearizedAttention", "AttentionTransfer", "NEW_PARAMETER_PREFIX"]

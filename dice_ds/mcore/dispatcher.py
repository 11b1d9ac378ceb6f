"""megatron-core's all-to-all token dispatcher, the base class of dice_ds's dispatchers.

``dice_ds.moe.dispatcher`` subclasses ``MoEAlltoAllTokenDispatcher`` (taken from here, so that
megatron stays behind this package); what those subclasses override is listed in patches/README.md.
"""

from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

__all__ = ["MoEAlltoAllTokenDispatcher"]

"""The Python API: ``DiTMoEPipeline`` and ``DiTMoEPipelineOutput`` (diffusers' pipeline shape).

Modules: ``core`` (the pipeline object and its call), ``prepare`` (settings -> validated
``PipelineSpec``, process groups), ``resources`` (the planned memory against this machine's,
before building), ``build`` (model and runtime, once), ``call`` (a call's arguments,
their agreement across ranks, each sample's noise and label), ``output`` (output types, delivery
to the output ranks, exchange totals). ``dice-ds sample`` (``dice_ds.sample``) is built on it.
"""

from dice_ds.pipeline.core import DiTMoEPipeline
from dice_ds.pipeline.output import DiTMoEPipelineOutput

__all__ = ["DiTMoEPipeline", "DiTMoEPipelineOutput"]

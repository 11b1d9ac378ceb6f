"""``dice-ds plan``: an analytical model of one sampling batch per parallel mode.

Owns predicting step time, speed-up over sync EP, communication share and per-GPU cache memory
from the model config, a device (FLOPs and throughput, or per-phase seconds measured by
``dice-ds bench``) and a link (bandwidth, latency). Modules: ``costs`` (per-layer compute and
message sizes), ``presets`` (devices and links), ``sim`` (the exchange schedule of
``docs/design.md`` replayed per rank), ``memory``, ``predict`` (modes -> predictions),
``validate`` (against a bench JSON), ``report`` and ``cli``. Method: docs/plan.md.
"""

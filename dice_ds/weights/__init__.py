"""Checkpoints: every way weights enter or leave dice_ds, one concern per module.

- ``header.py``: the ``.safetensors`` header, validated at least as strictly as the
  ``safetensors`` library (which is asked too), and ``CheckpointFormatError``.
- ``read.py``: the one reader, ``open_checkpoint(path)`` (names, dtypes and shapes first, bytes one
  region at a time; ``.safetensors``, torch zip and legacy ``.pt``, or an in-memory dict through
  ``InMemoryReader``), with one-line ``ConfigError``s for unreadable files; ``read_state_dict``
  reads a whole file through it; NaN/inf refused per region as it is read; ``reader.metadata``.
- ``keymap.py``: the one key map, ``released_sources`` (released DiT-MoE names -> dice_ds's
  megatron layout, either experts layout, any expert placement) and its inverses.
- ``check.py``: facts read off names and shapes (``inspect_checkpoint``), the ``ModelConfig`` they
  fix (``config_for_checkpoint``), completeness and dtypes (``check_complete``) and identity (the
  architecture written into a file's metadata: ``architecture_metadata``, ``check_architecture``),
  before any process group.
- ``load.py``: ``load_into_model`` (this rank's tensors only, streamed into a built model).
- ``save.py``: ``export_released_state_dict`` / ``save_checkpoint`` of a built model.
- ``write.py``: random real-size checkpoints in bounded memory and ``dice-ds make-checkpoint``.

Each module imports only those above it in this list (no cycle); this file imports none of them,
so importing one concern does not load the others.
"""

"""``python -m dice_ds.sample`` (what torchrun, the deepspeed launcher and srun start on each rank):
``dice_ds.sample.entry.main``, then exit without interpreter teardown (``entry.exit_after``)."""

from dice_ds.sample.entry import exit_after, main

if __name__ == "__main__":
    exit_after(main())

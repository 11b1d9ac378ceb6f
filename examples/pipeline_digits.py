"""The Python API on the shipped digits model: ten digits, on one process or on W ranks.

    python examples/pipeline_digits.py                                            # one process (DP)
    torchrun --nproc_per_node 2 examples/pipeline_digits.py configs/ds/digits_dice.json  # DICE, 2 ranks

Writes digit_0.png .. digit_9.png (rank 0 receives the images; the other ranks get None). The
optional arguments are for the tests: a ds_config path, ``--steps S``, ``--cli-labels`` (labels drawn
per sample index as ``dice-ds sample`` draws them, so that the images equal its samples 0..9),
``--latents`` (save the raw samples as latents.npy instead of PNGs) and ``--out DIR``.
"""

import argparse
import os

from dice_ds import DiTMoEPipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("config", nargs="?", help="ds_config (e.g. configs/ds/digits_dice.json)")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--cli-labels", action="store_true")
parser.add_argument("--latents", action="store_true")
parser.add_argument("--out", default=".")
args = parser.parse_args()
labels = None if args.cli_labels else list(range(10))

# the five lines of the README
pipe = DiTMoEPipeline.from_pretrained("digits", config=args.config)
out = pipe(class_labels=labels, batch_size=10, num_inference_steps=args.steps, seed=0,
           output_type="latent" if args.latents else "pil")
if out.images is not None:  # rank 0
    if args.latents:
        import numpy as np

        np.save(os.path.join(args.out, "latents.npy"), out.images.numpy())
    else:
        for i, image in enumerate(out.images):
            image.save(os.path.join(args.out, f"digit_{i}.png"))

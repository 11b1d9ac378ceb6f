"""Turning sampled latents into uint8 images: the SD VAE, the identity map, or nothing.

Owns ``build_decoder(kind, path, device)`` and the pixel conversion ``to_uint8_nhwc``. A decoder has
``decode(z) -> uint8 [N, H, W, 3]`` (what the CLI writes) and ``decode_float(z) -> fp32 [N, C, H, W]``
in [-1, 1] before quantisation (the pipeline's ``np``/``pt`` outputs); ``decode`` is
``to_uint8_nhwc(decode_float(z))``.

- ``sd``: diffusers ``AutoencoderKL.from_pretrained(path, local_files_only=True)`` (never the network),
  slicing enabled; ``decode(latent / 0.18215)``.
- ``identity``: the model works in pixel space; its output is the image in [-1, 1] with 1 or 3
  channels (1 is repeated to RGB).
- ``none``: no decoder (``build_decoder`` returns None); the run writes latents only.

Pixels: ``clamp(127.5·x + 128, 0, 255)`` truncated to uint8, laid out HWC (the reference's formula).

Shape legend: N batch, C channels, H/W side.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from dice_ds.config import ConfigError

SD_LATENT_SCALE = 0.18215
SD_PIXELS_PER_LATENT = 8


def to_uint8_nhwc(x_NCHW: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] -> uint8 [N, H, W, 3] (1 channel is repeated to 3)."""
    if x_NCHW.shape[1] == 1:
        x_NCHW = x_NCHW.expand(-1, 3, -1, -1)
    if x_NCHW.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 image channels, got {x_NCHW.shape[1]}")
    pix = torch.clamp(127.5 * x_NCHW.float() + 128.0, 0, 255)
    return pix.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


class IdentityDecoder:
    """The model output is already the image in [-1, 1]."""

    def __init__(self, channels: int):
        if channels not in (1, 3):
            raise ConfigError(f"--vae identity needs a model with 1 or 3 image channels, this one "
                              f"has {channels}: use --vae sd or --vae none")

    def decode_float(self, z_NCHW: torch.Tensor) -> torch.Tensor:
        """The image in [-1, 1] (unclamped), fp32 [N, C, H, W]."""
        return z_NCHW.float()

    def decode(self, z_NCHW: torch.Tensor) -> np.ndarray:
        return to_uint8_nhwc(z_NCHW)


class SDDecoder:
    """diffusers ``AutoencoderKL`` decode of latents scaled by 1 / 0.18215."""

    def __init__(self, path: str, device: torch.device | str, channels: int):
        from diffusers.models import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
        latent = self.vae.config.latent_channels
        if latent != channels:
            raise ConfigError(f"--vae-path {path}: the VAE has {latent} latent channels but the "
                              f"model produces {channels}")
        self.vae.enable_slicing()  # decode one sample at a time: bounded VAE memory

    @torch.no_grad()
    def decode_float(self, z_NCHW: torch.Tensor) -> torch.Tensor:
        """The decoded image in [-1, 1] (unclamped), fp32 [N, 3, H, W]."""
        z = (z_NCHW / SD_LATENT_SCALE).to(self.vae.dtype)
        return self.vae.decode(z).sample.float()

    def decode(self, z_NCHW: torch.Tensor) -> np.ndarray:
        return to_uint8_nhwc(self.decode_float(z_NCHW))


def check_decoder(kind: str, path: str | None, channels: int) -> None:
    """Check (without loading weights) that the decoder fits a model with ``channels`` channels."""
    if kind == "identity":
        IdentityDecoder(channels)
    elif kind == "sd":
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise ConfigError(f"--vae-path {path}: no config.json (expected a diffusers "
                              "AutoencoderKL directory saved with save_pretrained)")
        with open(config) as fh:
            conf = json.load(fh)
        latent = conf.get("latent_channels", 4)
        factor = 2 ** (len(conf.get("block_out_channels", (0,) * 4)) - 1)
        if factor != SD_PIXELS_PER_LATENT:
            raise ConfigError(f"--vae-path {path}: the VAE upsamples latents x{factor}, dice_ds "
                              f"expects x{SD_PIXELS_PER_LATENT} (SD VAE layout, 4 resolution levels)")
        if latent != channels:
            raise ConfigError(f"--vae-path {path}: the VAE has {latent} latent channels but the "
                              f"model produces {channels}")


def build_decoder(kind: str, path: str | None, device: torch.device | str, channels: int):
    """A decoder with ``decode(z_NCHW) -> uint8 [N, H, W, 3]``, or None for ``kind='none'``."""
    if kind == "none":
        return None
    if kind == "identity":
        return IdentityDecoder(channels)
    if kind == "sd":
        return SDDecoder(path, device, channels)
    raise ConfigError(f"--vae {kind!r}: use sd, identity or none")

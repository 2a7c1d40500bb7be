"""Neural networks of ecgtwin: the ECG VAE, the Individual Base Extractor, the AdaX denoiser and
the diffusion process with its samplers. See docs/models.md.

`paper_config()` gives the sizes of the papers' code (the schema's defaults); the demo's sizes live in
configs/demo.yaml only. Both are plain dataclasses that round-trip through dicts/YAML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .diffusion import (DiffusionConfig, GaussianDiffusion, ModelFn, SAMPLERS, guided_eps,
                        guided_model_fn)
from .dit import INJECTORS, AdaXBlock, AdaXDenoiser, DiTConfig, sample_drop_masks
from .ibe import IBEConfig, IndividualBaseExtractor, info_nce, public_negative_nce
from .layers import condition_tokens
from .vae import LATENT_SCALE, ECGVAE, VAEConfig, kl_weight_at, vae_loss
from ecgtwin.errors import UserError

TEXT_DIM = 384          # all-MiniLM-L6-v2 statement embeddings
PATIENT_DIM = 3         # normalised [HR, age, sex]


@dataclass
class ModelConfig:
    """All model sizes of one experiment."""
    vae: VAEConfig = field(default_factory=VAEConfig)
    ibe: IBEConfig = field(default_factory=IBEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        if self.ibe.cond_dim != self.dit.cond_dim:
            raise UserError(f"IBE and DiT condition widths differ: {self.ibe.cond_dim} vs {self.dit.cond_dim}")
        if self.ibe.base_dim != self.dit.base_dim:
            raise UserError(f"IBE base vector ({self.ibe.base_dim}) does not fit the DiT ({self.dit.base_dim})")
        if not (self.vae.latent_channels == self.ibe.latent_channels == self.dit.latent_channels):
            raise UserError("latent_channels differ between VAE, IBE and DiT")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(vae=VAEConfig(**d.get("vae", {})), ibe=IBEConfig(**d.get("ibe", {})),
                   dit=DiTConfig(**d.get("dit", {})), diffusion=DiffusionConfig(**d.get("diffusion", {})))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for section in d.values():   # tuples -> lists for YAML
            for k, v in section.items():
                if isinstance(v, tuple):
                    section[k] = list(v)
        return d


def paper_config(text_dim: int = TEXT_DIM) -> ModelConfig:
    """Sizes of the authors' code: SD-style VAE (128 channels, x1/2/4/4), IBE 3 x 256,
    AdaX DiT 7 x 256, 8 heads."""
    cond = text_dim + PATIENT_DIM
    return ModelConfig(ibe=IBEConfig(cond_dim=cond), dit=DiTConfig(cond_dim=cond))


__all__ = [
    "AdaXBlock", "AdaXDenoiser", "DiTConfig", "DiffusionConfig", "ECGVAE", "GaussianDiffusion",
    "IBEConfig", "INJECTORS", "IndividualBaseExtractor", "LATENT_SCALE", "ModelConfig", "ModelFn",
    "PATIENT_DIM", "SAMPLERS", "TEXT_DIM", "VAEConfig", "condition_tokens",
    "guided_eps", "guided_model_fn", "info_nce", "public_negative_nce", "kl_weight_at", "paper_config",
    "sample_drop_masks", "vae_loss",
]

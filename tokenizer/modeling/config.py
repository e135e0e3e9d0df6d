"""`DoveConfig`: everything needed to build a DOVE / Q-DOVE tokenizer, and nothing about training.

The config holds *architectures* (a diffusers `VQModel` config and a GPT-NeoX config as plain dicts),
never download sources, so that a saved checkpoint rebuilds offline from its own `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"


@dataclass
class DoveConfig:
    """Architecture of a DOVE tokenizer.

    `vq` is passed verbatim to `diffusers.VQModel(**vq)`; `generator` to `transformers.GPTNeoXConfig`.
    The latent grid side is derived from the VQ's number of down blocks, so the two cannot disagree.
    """

    image_size: int = 64
    vq: dict[str, Any] = field(default_factory=dict)
    generator: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 32
    min_tokens: int = 1
    token_dim: int = 32
    eos_threshold: float = 0.5
    max_query_tokens: int = 32
    decoder_hidden_size: int = 128
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    # False: the VQ's continuous pre-quantisation latents. For an autoencoder trained from scratch the
    # codebook only slows learning; a pretrained VQGAN (aMUSEd) keeps its quantised latents.
    quantize_latents: bool = True
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"DoveConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"DoveConfig.min_tokens must lie in [1, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if not 0.0 < self.eos_threshold < 1.0:
            raise ValueError(f"DoveConfig.eos_threshold must lie in (0, 1), got {self.eos_threshold}")
        if self.image_size % self.downsample_factor != 0:
            raise ValueError(
                f"DoveConfig.image_size={self.image_size} is not divisible by the VQ's downsample factor "
                f"{self.downsample_factor}"
            )

    @property
    def downsample_factor(self) -> int:
        blocks = len(self.vq.get("down_block_types", ("DownEncoderBlock2D",)))
        return 2 ** (blocks - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def latent_channels(self) -> int:
        return int(self.vq.get("vq_embed_dim") or self.vq.get("latent_channels", 3))

    @property
    def generator_hidden_size(self) -> int:
        return int(self.generator["hidden_size"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "DoveConfig") -> DoveConfig:
        """Build from plain data, checking each field's type first; errors name `where` and the field.

        A config.json edited by hand ("max_tokens": "32") would otherwise fail deep inside model
        construction with a message that names neither the file nor the field.
        """
        if not isinstance(data, dict):
            raise TypeError(f"{where}: must be a JSON object of DoveConfig fields, got a {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown DoveConfig fields: {unknown}; known fields: {sorted(fields)}")
        for name, value in data.items():
            _check_field_type(fields[name], value, where)
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DoveConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no DOVE config at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if isinstance(data, dict):
            data.pop("model_type", None)
        return cls.from_dict(data, where=str(path))


def _check_field_type(spec: dataclasses.Field, value: Any, where: str) -> None:
    """The JSON type a field's default implies: bool, int, float (an int is accepted), dict, or str/null."""
    default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default  # type: ignore[misc]
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, dict):
        ok, kind = isinstance(value, dict), "a JSON object"
    else:
        ok, kind = value is None or isinstance(value, str), "a string or null"
    if not ok:
        raise ValueError(f"{where}: field {spec.name!r} must be {kind}, got {value!r}")

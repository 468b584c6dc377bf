"""Named preprocessing presets, stored as YAML data and recorded in every cache and checkpoint.

A preset is the *whole* recipe from a read :class:`Volume` to the model's input tensor. Training caches
and checkpoints store the preset itself (not just its name), and :attr:`Preset.sha256` identifies it, so
training and inference cannot silently disagree on HU normalisation or geometry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from rrg3d.errors import PresetError, RRG3DError
from rrg3d.io.volume import Volume
from rrg3d.preprocess import ops

PRESET_FORMAT_VERSION = 1
FIT_MODES = ("crop_pad", "resize")
INTENSITY_KINDS = ("window", "suv", "minmax", "none")
PET_NORMS = ("suv_range", "log_percentile")


@dataclasses.dataclass(frozen=True)
class Intensity:
    """Intensity mapping: ``window`` (HU), ``suv`` (PET converted to SUVbw first, then windowed), ``minmax`` or
    ``none``.

    ``minmax`` maps each scan's own minimum and maximum onto ``out_range`` (after clipping to ``window`` when one is
    given), as RadFM's data code does — contrast within a scan, absolute HU lost; a constant scan maps to the low end.
    """

    kind: Literal["window", "suv", "minmax", "none"] = "window"
    window: tuple[float, float] | None = (-1000.0, 200.0)
    out_range: tuple[float, float] = (0.0, 1.0)
    clip: bool = True

    def apply(self, volume: Volume) -> Volume:
        """Window the values (already SUV for the ``suv`` kind: see :meth:`Preset.apply`)."""
        if self.kind == "minmax":
            return volume.replace(array=self._minmax(np.asarray(volume.array, dtype=np.float32)))
        if self.kind == "none" or self.window is None:
            return volume.replace(array=np.asarray(volume.array, dtype=np.float32))
        low, high = self.window
        return volume.replace(array=ops.window(volume.array, low, high, self.out_range, self.clip))

    def _minmax(self, array: np.ndarray) -> np.ndarray:
        if self.window is not None:
            array = np.clip(array, np.float32(self.window[0]), np.float32(self.window[1]))
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not high > low:
            return np.full(array.shape, np.float32(self.out_range[0]), dtype=np.float32)
        return ops.window(array, low, high, self.out_range, clip=True)


@dataclasses.dataclass(frozen=True)
class PetIntensity:
    """How the PET channel of a PET/CT preset is normalised, after it is resampled onto the CT's output grid.

    * ``suv_range`` (default): SUVbw clipped to ``window`` and mapped linearly onto ``out_range`` — the same SUV
      gives the same value in every scan, so the absolute SUV that reports quote (SUVmax 12.3) stays readable;
    * ``log_percentile`` (PETRG-3D's released code): ``log1p(SUV)``, clipped at the scan's ``percentile``-th
      percentile, divided by the scan's maximum — contrast within a scan, absolute SUV lost.

    Voxels of the grid outside the PET's field of view get ``pad_value`` (SUV 0: no uptake), never a CT value.
    """

    norm: Literal["suv_range", "log_percentile"] = "suv_range"
    window: tuple[float, float] = (0.0, 20.0)
    out_range: tuple[float, float] = (0.0, 1.0)
    percentile: float = 99.5
    pad_value: float = 0.0

    def __post_init__(self) -> None:
        if self.norm not in PET_NORMS:
            raise PresetError(f"pet.norm must be one of {PET_NORMS}, got {self.norm!r}")
        if not self.window[1] > self.window[0]:
            raise PresetError("pet.window needs low < high")
        if not 0 < self.percentile <= 100:
            raise PresetError(f"pet.percentile must be in (0, 100], got {self.percentile}")

    def apply(self, suv: np.ndarray) -> np.ndarray:
        """Normalise an SUV array (float32 out)."""
        if self.norm == "suv_range":
            return ops.window(suv, self.window[0], self.window[1], self.out_range, clip=True)
        logged = np.log1p(np.clip(np.asarray(suv, dtype=np.float32), 0.0, None))
        ceiling = float(np.percentile(logged, self.percentile)) if logged.size else 0.0
        np.minimum(logged, np.float32(ceiling), out=logged)
        peak = float(logged.max(initial=0.0))
        return logged / np.float32(peak) if peak > 0 else logged


@dataclasses.dataclass(frozen=True)
class Preset:
    """A complete preprocessing recipe; every geometric tuple is in (D, H, W) order."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    fit: Literal["crop_pad", "resize"] = "crop_pad"
    intensity: Intensity = dataclasses.field(default_factory=Intensity)
    modality: str = "CT"
    pad_value: float = -1024.0
    cache_dtype: str = "float16"
    description: str = ""
    family: str | None = None
    stage: int | None = None
    #: PET/CT presets: the PET channel, resampled onto the CT's output grid and normalised (:class:`PetIntensity`);
    #: the model input is then ``[2, D, H, W]`` (CT, PET). None: a single-image preset.
    pet: PetIntensity | None = None
    version: int = PRESET_FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(n) < 1 for n in self.shape):
            raise PresetError(f"preset {self.name!r}: shape must be three positive integers (D, H, W)")
        if self.spacing is not None and (len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing)):
            raise PresetError(f"preset {self.name!r}: spacing must be three positive numbers (D, H, W) or null")
        if self.fit not in FIT_MODES:
            raise PresetError(f"preset {self.name!r}: fit must be one of {FIT_MODES}, got {self.fit!r}")
        if self.fit == "crop_pad" and self.spacing is None:
            raise PresetError(f"preset {self.name!r}: fit 'crop_pad' needs a spacing")
        if self.intensity.kind not in INTENSITY_KINDS:
            raise PresetError(f"preset {self.name!r}: intensity kind must be one of {INTENSITY_KINDS}")
        if self.intensity.window is not None and not self.intensity.window[1] > self.intensity.window[0]:
            raise PresetError(f"preset {self.name!r}: intensity window needs low < high")
        if self.cache_dtype not in ("float16", "float32"):
            raise PresetError(f"preset {self.name!r}: cache_dtype must be float16 or float32")

    # -- (de)serialisation -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Preset:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PresetError(f"{source}: unknown preset keys {unknown} (known: {sorted(known)})")
        if "name" not in data or "shape" not in data:
            raise PresetError(f"{source}: a preset needs at least 'name' and 'shape'")
        values = dict(data)
        try:
            values["shape"] = tuple(int(n) for n in values["shape"])
            if values.get("spacing") is not None:
                values["spacing"] = tuple(float(s) for s in values["spacing"])
            intensity = dict(values.get("intensity") or {})
            bad = sorted(set(intensity) - {f.name for f in dataclasses.fields(Intensity)})
            if bad:
                raise PresetError(f"{source}: unknown intensity keys {bad}")
            if intensity.get("window") is not None:
                intensity["window"] = tuple(float(v) for v in intensity["window"])
            if "out_range" in intensity:
                intensity["out_range"] = tuple(float(v) for v in intensity["out_range"])
            values["intensity"] = Intensity(**intensity)
            if "pad_value" in values:
                values["pad_value"] = float(values["pad_value"])
            if values.get("pet") is not None:
                pet = dict(values["pet"])
                bad = sorted(set(pet) - {f.name for f in dataclasses.fields(PetIntensity)})
                if bad:
                    raise PresetError(f"{source}: unknown pet keys {bad}")
                for key in ("window", "out_range"):
                    if key in pet:
                        pet[key] = tuple(float(v) for v in pet[key])
                values["pet"] = PetIntensity(**pet)
        except (TypeError, ValueError) as exc:
            raise PresetError(f"{source}: malformed preset ({exc})") from exc
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("shape", "spacing"):
            if data[key] is not None:
                data[key] = list(data[key])
        for key in ("window", "out_range"):
            if data["intensity"][key] is not None:
                data["intensity"][key] = list(data["intensity"][key])
        if data["pet"] is None:
            data.pop("pet")  # single-image presets keep the hash they had before PET/CT presets existed
        else:
            for key in ("window", "out_range"):
                data["pet"][key] = list(data["pet"][key])
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def sha256(self) -> str:
        """Identity of everything that changes the output (the description does not count)."""
        data = self.to_dict()
        data.pop("description", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What caches and checkpoints store: the full preset plus its hash."""
        return {"preset": self.name, "sha256": self.sha256, "config": self.to_dict()}

    # -- application -------------------------------------------------------------------------------
    def output_grid(self, volume: Volume) -> np.ndarray:
        """The affine of the output grid for this volume (crop_pad mode)."""
        assert self.spacing is not None
        return ops.centered_grid(volume, self.spacing, self.shape)

    def apply(self, volume: Volume) -> Volume:
        """Geometry then intensity: the model-ready float32 volume with an exact affine."""
        if self.intensity.kind == "suv":
            volume = ops.to_suv(volume)  # before resampling, so that padding (0) is in SUV too
        result = self.intensity.apply(self.apply_geometry(volume, order=1, fill=self.pad_value))
        result.meta["preprocess"] = {"preset": self.name, "sha256": self.sha256}
        return result

    def apply_geometry(self, volume: Volume, order: int = 1, fill: float | None = None) -> Volume:
        """Only the geometric part; ``order=0`` for label maps (nearest neighbour, dtype kept)."""
        fill = self.pad_value if fill is None else fill
        if self.fit == "crop_pad":
            assert self.spacing is not None
            return ops.resample_to_grid(volume, self.output_grid(volume), self.shape, order=order, fill=fill)
        if self.spacing is not None:
            grid_shape = ops.resampled_shape(volume, self.spacing)
            volume = ops.resample_to_grid(volume, ops.centered_grid(volume, self.spacing, grid_shape), grid_shape,
                                          order=order, fill=fill)
        return ops.resize(volume, self.shape, order=order)

    @property
    def channels(self) -> int:
        """Channels of the model input: 2 for a PET/CT preset (CT, PET), else 1."""
        return 2 if self.pet is not None else 1

    def apply_pet(self, pet: Volume, ct_output: Volume, *, where: str = "PET") -> Volume:
        """The PET channel of a PET/CT preset: SUV, resampled (trilinear, world coordinates from both affines) onto
        ``ct_output``'s grid — what :meth:`apply` made of the study's CT — then normalised. A PET that does not
        overlap that grid in world space is an error (a mismatched pair), not an empty channel."""
        if self.pet is None:
            raise PresetError(f"preset {self.name!r} has no pet section: it is not a PET/CT preset")
        try:
            suv = ops.to_suv(pet)
        except PresetError:
            raise
        except RRG3DError as exc:
            raise PresetError(f"{where}: {exc} (for a file already in SUV, say so: meta.pet_units \"SUVbw\" in the "
                              "manifest, or --pet-units SUVbw)") from exc
        overlap = ops.world_overlap(suv, ct_output)
        if overlap <= 0.0:
            raise PresetError(f"{where}: the PET and the CT do not overlap in world space (PET extent "
                              f"{ops.world_extent_text(suv)}, CT grid {ops.world_extent_text(ct_output)}); "
                              "are they from the same study, with correct headers?")
        grid = ops.resample_to_grid(suv, ct_output.affine, tuple(ct_output.shape), order=1, fill=self.pet.pad_value)
        pad_mask = None
        if self.pet.pad_value != 0.0:
            pad_mask = ops.resample_to_grid(suv.replace(array=np.ones(suv.shape, dtype=np.uint8)), ct_output.affine,
                                            tuple(ct_output.shape), order=0, fill=0).array == 0
        array = self.pet.apply(grid.array)
        if pad_mask is not None:
            array[pad_mask] = np.float32(self.pet.pad_value)
        meta = dict(grid.meta, pet_overlap=round(overlap, 4))
        meta["preprocess"] = {"preset": self.name, "sha256": self.sha256}
        return grid.replace(array=array.astype(np.float32, copy=False), meta=meta)

    def apply_mask(self, mask: Volume) -> Volume:
        """Bring a label map onto the same grid as :meth:`apply` gives its image (nearest neighbour, fill 0)."""
        return self.apply_geometry(mask, order=0, fill=0)


def _builtin_dir() -> Any:
    return resources.files("rrg3d") / "presets"


def list_presets() -> list[str]:
    """Names of the presets shipped with rrg3d."""
    return sorted(p.name[: -len(".yaml")] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path | dict[str, Any] | Preset) -> Preset:
    """A preset by built-in name, by YAML path, from a dict (e.g. a checkpoint's record) or as is."""
    if isinstance(name_or_path, Preset):
        return name_or_path
    if isinstance(name_or_path, dict):
        data = name_or_path.get("config", name_or_path)
        return Preset.from_dict(dict(data), source="preset record")
    text_name = str(name_or_path)
    path = Path(text_name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        source, text = str(path), path.read_text(encoding="utf-8")
    else:
        resource = _builtin_dir() / f"{text_name}.yaml"
        if not resource.is_file():
            raise PresetError(f"unknown preset {text_name!r}; built-in presets: {', '.join(list_presets())} "
                              "(or give a path to a preset YAML file)")
        source, text = f"preset {text_name}", resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PresetError(f"{source}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise PresetError(f"{source}: a preset file must hold a mapping")
    return Preset.from_dict(data, source=source)


def preset_family(family: str) -> list[Preset]:
    """Presets of a family (e.g. ``multiscale``) ordered by stage: the progressive-training schedule."""
    members = [p for p in (load_preset(n) for n in list_presets()) if p.family == family]
    if not members:
        raise PresetError(f"no preset family {family!r}")
    return sorted(members, key=lambda p: p.stage or 0)

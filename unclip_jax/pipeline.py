"""unCLIP end to end: caption -> CLIP z_t -> prior -> z_i -> decoder -> upsampler(s) -> images.

    pipe = UnCLIPPipeline.from_config(configs.pipeline_shapes.get_config())
    out = pipe.generate(["a large red circle in the center on a white background"], seed=0,
                        num_per_prompt=4)
    out.images  # uint8 [4, 128, 128, 3]

The stages are `train.py` workdirs loaded with their EMA params onto one mesh (`stages.load`;
or `load.Loaded` objects given directly). Every stage runs as one compiled program per setting
(cached), over batches of rows sharded along the mesh's data axes (`parallel.map_batches`). The
programs are the stages' samplers (`PriorStage.sample_body`, `DecoderStage.sample_body`,
`UpsamplerStage.sample_body`).

The prior is either of the paper's two (§2.2): the diffusion prior (`PriorStage`) or the
autoregressive one (`ARPriorStage`, its PCA codes drawn token by token), as the pipeline config's
`prior.kind` says ("diffusion" | "autoregressive"); both map (z_t, caption hidden states, tokens,
rng) to a unit z_i, so everything after the prior (decoder, upsamplers, manipulations) is the same.

Seeds: row r of a request (prompt p, sample k) gets the key fold_in(fold_in(key(seed), p), k)
(`row_keys`), and each stage folds its own id into it. Each stage program is `jax.vmap`ped over
rows with `spmd_axis_name` set to the data axes (the rows stay sharded), so every row draws its own
noise: sample k of prompt p depends only on (seed, p, k) and the settings, never on the batch size
or on the other rows (up to float reassociation between differently sized programs).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unclip_jax import parallel, paths
from unclip_jax.data import images as image_lib
from unclip_jax.diffusion import pixels
from unclip_jax.models.layers import text_mask
from unclip_jax.stages import load
from unclip_jax.stages.ar_prior import ARPriorStage
from unclip_jax.stages.clip import ClipStage
from unclip_jax.stages.decoder import DecoderStage
from unclip_jax.stages.prior import PriorStage
from unclip_jax.stages.upsampler import UpsamplerStage
from unclip_jax.train import checkpointing

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
# The two priors of the paper (§2.2): `prior_kind` -> (the stage name train.py records, its class).
PRIOR_KINDS = {"diffusion": ("prior", PriorStage), "autoregressive": ("ar_prior", ARPriorStage)}
# PriorSettings fields of each kind (guidance_scale is both's).
_DIFFUSION_FIELDS = ("guidance_scale", "best_of", "sampler", "steps")
_AR_FIELDS = ("guidance_scale", "temperature", "top_k", "top_p", "dot_percentile")
DATA_AXES = ("data", "fsdp")
# Stage ids folded into a row's key (upsampler j uses UPSAMPLER_STREAM + j).
PRIOR_STREAM, DECODER_STREAM, UPSAMPLER_STREAM = 0, 1, 2


class StageError(ValueError):
    """A pipeline stage's workdir holds the wrong stage or a checkpoint that does not fit the others."""


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
def _check_sampler(stage: str, sampler: str | None) -> None:
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"{stage}.sampler={sampler!r}: expected one of {list(SAMPLERS)}")


def _check_steps(stage: str, steps) -> None:
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, (int, str, np.integer)) or (
            not isinstance(steps, str) and steps < 1) or (isinstance(steps, str) and not steps.strip()):
        raise ValueError(f"{stage}.steps={steps!r}: expected a positive int or a respacing spec "
                         "string like '50', 'ddim25' or '10,10,3,2,2'")


def _steps(value):
    """Config strings that are plain integers become ints (the respacing accepts both)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _check_non_negative(name: str, value) -> None:
    if value is not None and not float(value) >= 0:
        raise ValueError(f"{name}={value!r}: expected a number >= 0")


@dataclasses.dataclass(frozen=True)
class PriorSettings:
    """Prior sampling; None = the prior config's value.

    guidance_scale is both priors'; best_of, sampler and steps (an int or a
    respacing spec) the diffusion prior's (its config's `diffusion`); temperature (0: greedy),
    top_k (0: all), top_p (1: all) and dot_percentile (the part of the z_i . z_t token's
    distribution drawn above) the autoregressive prior's (its config's `ar`).
    """

    guidance_scale: float | None = None
    best_of: int | None = None
    sampler: str | None = None
    steps: int | str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    dot_percentile: float | None = None

    def __post_init__(self):
        _check_non_negative("prior.guidance_scale", self.guidance_scale)
        if self.best_of is not None and (isinstance(self.best_of, bool) or int(self.best_of) < 1):
            raise ValueError(f"prior.best_of={self.best_of!r}: expected an int >= 1")
        _check_sampler("prior", self.sampler)
        _check_steps("prior", self.steps)
        _check_non_negative("prior.temperature", self.temperature)
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k
                                       or self.top_k < 0):
            raise ValueError(f"prior.top_k={self.top_k!r}: expected an int >= 0 (0: all tokens)")
        if self.top_p is not None and not 0 < float(self.top_p) <= 1:
            raise ValueError(f"prior.top_p={self.top_p!r}: expected a number in (0, 1] (1: all tokens)")
        if self.dot_percentile is not None and not 0 <= float(self.dot_percentile) < 1:
            raise ValueError(f"prior.dot_percentile={self.dot_percentile!r}: expected a number in [0, 1)")

    def check_kind(self, kind: str) -> None:
        """ValueError if a field of the other prior is set (best_of 1 is allowed for both)."""
        own = _AR_FIELDS if kind == "autoregressive" else _DIFFUSION_FIELDS
        other = "diffusion" if kind == "autoregressive" else "autoregressive"
        for f in _DIFFUSION_FIELDS + _AR_FIELDS:
            value = getattr(self, f)
            if f not in own and value is not None and not (f == "best_of" and int(value) == 1):
                raise ValueError(f"prior.{f}={value!r} is a setting of the {other} prior; this "
                                 f"pipeline's prior is the {kind} one (prior.kind)")


@dataclasses.dataclass(frozen=True)
class DecoderSettings:
    """Decoder sampling; None = the decoder config's value. eta: DDIM stochasticity (ddim only)."""

    guidance_scale: float | None = None
    sampler: str | None = None
    steps: int | str | None = None
    eta: float | None = None

    def __post_init__(self):
        _check_non_negative("decoder.guidance_scale", self.guidance_scale)
        _check_sampler("decoder", self.sampler)
        _check_steps("decoder", self.steps)
        _check_non_negative("decoder.eta", self.eta)


@dataclasses.dataclass(frozen=True)
class UpsamplerSettings:
    """Sampling of every upsampler; None = each upsampler config's value."""

    sampler: str | None = None
    steps: int | str | None = None
    eta: float | None = None

    def __post_init__(self):
        _check_sampler("upsampler", self.sampler)
        _check_steps("upsampler", self.steps)
        _check_non_negative("upsampler.eta", self.eta)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sampling settings of the whole cascade (unset fields take the stages' config values)."""

    prior: PriorSettings = PriorSettings()
    decoder: DecoderSettings = DecoderSettings()
    upsampler: UpsamplerSettings = UpsamplerSettings()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Settings":
        """From a pipeline config's `prior`, `decoder` and `upsampler` blocks (None = stage default)."""
        def block(name, kind):
            sub = config.get(name)
            if sub is None:
                return kind()
            values = {f.name: sub.get(f.name) for f in dataclasses.fields(kind)}
            if "steps" in values:
                values["steps"] = _steps(values["steps"])
            return kind(**values)

        return cls(block("prior", PriorSettings), block("decoder", DecoderSettings),
                   block("upsampler", UpsamplerSettings))


def check_prior_kind(kind: str | None) -> str | None:
    """`prior.kind` of a pipeline config: "diffusion", "autoregressive" or None (either)."""
    if kind is not None and kind not in PRIOR_KINDS:
        raise ValueError(f"prior.kind={kind!r}: expected one of {list(PRIOR_KINDS)}")
    return kind


def prior_kind_from_config(config: ml_collections.ConfigDict) -> str | None:
    """The checked `prior.kind` of a pipeline config (None where it has none), with the prior
    settings of the other kind refused: what `UnCLIPPipeline.from_config` checks before loading."""
    prior = config.get("prior")
    kind = check_prior_kind(prior.get("kind") if prior is not None else None)
    if kind is not None:
        Settings.from_config(config).prior.check_kind(kind)
    return kind


def resolve(settings, diffusion: ml_collections.ConfigDict, names: Sequence[str] | None = None
            ) -> dict[str, Any]:
    """Concrete values of a stage's settings (`PriorSettings`, ...): the stage config's where unset.

    `names`: the fields resolved (default: all of them)."""
    out = {}
    for name in (names if names is not None else [f.name for f in dataclasses.fields(settings)]):
        value = getattr(settings, name)
        if value is None:
            default = {"steps": "sample_steps"}.get(name, name)
            value = diffusion.get(default, 0.0 if name == "eta" else None)
        out[name] = value
    if "steps" in out:
        out["steps"] = _steps(out["steps"])
    if out.get("sampler") != "ddim" and "eta" in out:
        out["eta"] = None
    return out


# ---------------------------------------------------------------------------------------------
# Keys and outputs
# ---------------------------------------------------------------------------------------------
def row_keys(seed: int, prompt_indices: Sequence[int], sample_indices: Sequence[int]) -> np.ndarray:
    """Raw key data [N, key_words] uint32 of rows (prompt p, sample k): fold_in(fold_in(key(seed), p), k)."""
    p = np.asarray(prompt_indices, np.uint32).reshape(-1)
    k = np.asarray(sample_indices, np.uint32).reshape(-1)
    if p.shape != k.shape:
        raise ValueError(f"got {p.size} prompt indices but {k.size} sample indices")
    base = jax.random.key(int(seed))
    fn = jax.vmap(lambda a, b: jax.random.key_data(jax.random.fold_in(jax.random.fold_in(base, a), b)))
    return np.asarray(fn(p, k))


@dataclasses.dataclass
class Samples:
    """Rows of a `generate` call, prompt-major: row = prompt * num_per_prompt + sample.

    images: uint8 [N, S, S, 3] (after the last upsampler); base_images: uint8 [N, s, s, 3] (the
    decoder's); z_i: unit [N, D]; captions, prompt_index, sample_index: per row.
    """

    images: np.ndarray
    base_images: np.ndarray
    z_i: np.ndarray
    captions: list[str]
    prompt_index: np.ndarray
    sample_index: np.ndarray


def _stage_error(stage: str, workdir: str, message: str) -> StageError:
    return StageError(f"pipeline stage {stage!r} (workdir {workdir}): {message}")


def load_stage(stage: str, workdir: str, *, mesh: Mesh | None = None, which: str = "ema",
               prior_kind: str | None = None) -> load.Loaded:
    """`load.load_stage` with errors naming the pipeline stage and its workdir.

    The "prior" stage is the diffusion or the autoregressive prior as `prior_kind` says (None:
    either).

    Raises:
      load.NotTrainedError: the workdir, its config or its checkpoint is missing.
      StageError: the workdir trained another stage (or the other prior), or its checkpoint (or
        the CLIP cache it needs) does not fit its config.
    """
    if not workdir:
        raise _stage_error(stage, repr(workdir), "no workdir given: set it in the pipeline config")
    workdir = paths.resolve(workdir)
    stored = checkpointing.load_config(workdir) if os.path.isdir(workdir) else None
    held = None if stored is None else stored.get("stage")
    if stage == "prior":
        kinds = list(PRIOR_KINDS) if prior_kind is None else [prior_kind]
        expected = [PRIOR_KINDS[k][0] for k in kinds]
        other = {name: kind for kind, (name, _) in PRIOR_KINDS.items()}.get(held)
        if stored is not None and held not in expected and other is not None:
            raise _stage_error(stage, workdir, f"it holds the {other} prior (stage {held!r}), but the "
                                               f"pipeline config has prior.kind={prior_kind!r}: set "
                                               f"prior.kind={other!r} or point prior_workdir at "
                                               f"a{'n' if prior_kind == 'autoregressive' else ''} "
                                               f"{prior_kind} prior")
    else:
        expected = ["upsampler" if stage.startswith("upsampler") else stage]
    if stored is not None and held not in expected:
        raise _stage_error(stage, workdir, f"it holds a trained {held!r} stage, "
                                           f"not a {' or '.join(map(repr, expected))}: check the "
                                           "pipeline config")
    try:
        return load.load_stage(workdir, which, mesh=mesh)
    except load.NotTrainedError as e:
        raise load.NotTrainedError(f"pipeline stage {stage!r}: {e}") from e
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise _stage_error(stage, workdir, f"cannot be loaded: {e}") from e


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
class UnCLIPPipeline:
    """The unCLIP cascade over trained stages, sampling in sharded batches of `batch_size` rows."""

    def __init__(self, clip: load.Loaded, prior: load.Loaded, decoder: load.Loaded,
                 upsamplers: Sequence[load.Loaded] = (), *, mesh: Mesh | None = None,
                 batch_size: int = 64, settings: Settings | None = None, prior_kind: str | None = None):
        """Joins trained stages (see `load_stage`); their params must live on `mesh` (default: the
        CLIP's). `prior_kind` ("diffusion" | "autoregressive"; None: either) is the prior `prior`
        must be."""
        self.clip, self.prior, self.decoder = clip, prior, decoder
        self.expected_prior_kind = check_prior_kind(prior_kind)
        self.upsamplers = list(upsamplers)
        self.mesh = mesh if mesh is not None else clip.mesh
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
        self.batch_size = int(batch_size)
        self.settings = settings or Settings()
        self._check_stages()
        self._programs: dict[tuple, Callable] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_workdirs(cls, clip: str, prior: str, decoder: str, upsamplers: Sequence[str] = (), *,
                      mesh: Mesh | None = None, which: str = "ema", batch_size: int = 64,
                      settings: Settings | None = None, prior_kind: str | None = None) -> "UnCLIPPipeline":
        """Loads every stage's `which` params ("ema") from its workdir onto `mesh` (default: all
        devices). `prior` holds the diffusion or the autoregressive prior, as `prior_kind` says
        (None: either)."""
        check_prior_kind(prior_kind)
        mesh = mesh if mesh is not None else parallel.make_mesh((-1, 1, 1))
        stages = [load_stage(name, w, mesh=mesh, which=which, prior_kind=prior_kind)
                  for name, w in (("clip", clip), ("prior", prior), ("decoder", decoder))]
        ups = [load_stage(f"upsampler{j}", w, mesh=mesh, which=which) for j, w in enumerate(upsamplers)]
        return cls(*stages, ups, mesh=mesh, batch_size=batch_size, settings=settings, prior_kind=prior_kind)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, *, batch_size: int = 64) -> "UnCLIPPipeline":
        """From a pipeline config (see configs/pipeline_shapes.py): workdirs, params, mesh, settings,
        and the prior's kind (`prior.kind`)."""
        kind = prior_kind_from_config(config)
        mesh = parallel.mesh_from_config(config.mesh) if "mesh" in config else None
        return cls.from_workdirs(config.clip_workdir, config.prior_workdir, config.decoder_workdir,
                                 tuple(config.upsampler_workdirs), mesh=mesh,
                                 which=config.get("params", "ema"), batch_size=batch_size,
                                 settings=Settings.from_config(config), prior_kind=kind)

    def _check_stages(self):
        def fail(stage, trained, message):
            raise _stage_error(stage, trained.workdir, message)

        prior_classes = tuple(cls for _, cls in PRIOR_KINDS.values())
        for stage, trained, kind in (("clip", self.clip, ClipStage),
                                     ("prior", self.prior, prior_classes),
                                     ("decoder", self.decoder, DecoderStage),
                                     *((f"upsampler{j}", u, UpsamplerStage)
                                       for j, u in enumerate(self.upsamplers))):
            if not isinstance(trained.stage, kind):
                names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                fail(stage, trained, f"expected a trained {names}, got stage "
                                     f"{trained.config.get('stage')!r}")
        self.prior_kind = next(k for k, (_, cls) in PRIOR_KINDS.items() if isinstance(self.prior.stage, cls))
        wanted = self.expected_prior_kind
        if wanted is not None and wanted != self.prior_kind:
            fail("prior", self.prior, f"it is the {self.prior_kind} prior, but the pipeline asks for "
                                      f"prior.kind={wanted!r}")
        try:
            self.settings.prior.check_kind(self.prior_kind)
        except ValueError as e:
            fail("prior", self.prior, str(e))
        self.karlo = bool(getattr(self.prior.stage, "karlo", False))
        for stage, trained in (("decoder", self.decoder),
                               *((f"upsampler{j}", u) for j, u in enumerate(self.upsamplers))):
            if bool(getattr(trained.stage, "karlo", False)) != self.karlo:
                fail(stage, trained, "mixes imported Karlo stages (diffusion.sampler='karlo') with "
                                     "this project's: a pipeline is all Karlo or none")
        model = self.clip.stage.model
        dims = {"embed_dim": int(model.embed_dim), "text_length": int(model.context_length),
                "text_width": int(model.text_width)}
        prior = self.prior.stage
        got = {"embed_dim": prior.embed_dim, "text_length": prior.text_length, "text_width": prior.text_width}
        if got != dims:
            fail("prior", self.prior, f"trained on a CLIP with {got}, but the pipeline's CLIP "
                                      f"({self.clip.workdir}) has {dims}")
        dec = self.decoder.stage
        got = {"embed_dim": dec.clip_dim, "text_length": dec.text_length}
        want = {k: dims[k] for k in got}
        if got != want:
            fail("decoder", self.decoder, f"trained on a CLIP with {got}, but the pipeline's CLIP "
                                          f"({self.clip.workdir}) has {want}")
        clip_dir = self.clip.workdir
        for stage, trained in (("prior", self.prior), ("decoder", self.decoder)):
            theirs = trained.depends_on.get("clip_workdir", clip_dir) if trained.workdir else clip_dir
            if theirs != clip_dir:
                logging.warning("pipeline stage %r was trained on the CLIP of %s, not %s: the "
                                "embedding spaces must be the same", stage, theirs, clip_dir)
        side = dec.side
        for j, up in enumerate(self.upsamplers):
            low = up.stage.side // up.stage.scale
            if low != side:
                fail(f"upsampler{j}", up, f"upsamples {low} px images to {up.stage.side} px, but "
                                          f"its input here is {side} px")
            side = up.stage.side

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        """The CLIP's tokenizer (captions -> int32 [N, context_length])."""
        return self.clip.stage.tokenizer

    @property
    def base_size(self) -> int:
        """Side of the decoder's images (px)."""
        return int(self.decoder.stage.side)

    @property
    def image_size(self) -> int:
        """Side of the final images (px)."""
        return int(self.upsamplers[-1].stage.side) if self.upsamplers else self.base_size

    def resolved_settings(self, settings: Settings | None = None) -> dict[str, Any]:
        """The concrete settings every stage samples with, and each stage's workdir and step (JSON)."""
        s = settings or self.settings
        stages = [("clip", self.clip), ("prior", self.prior), ("decoder", self.decoder),
                  *((f"upsampler{j}", u) for j, u in enumerate(self.upsamplers))]
        out = {
            "stages": {name: {"workdir": t.workdir, "step": int(t.step),
                              "params": t.which} for name, t in stages},
            "prior": self._resolve_prior(s.prior),
            "decoder": resolve(s.decoder, self.decoder.config.diffusion),
            "upsamplers": [resolve(s.upsampler, u.config.diffusion) for u in self.upsamplers],
        }
        out["stages"]["prior"]["kind"] = self.prior_kind
        return out

    def _resolve_prior(self, settings: PriorSettings) -> dict[str, Any]:
        """The prior's concrete settings: its own kind's fields, from its config where unset."""
        settings.check_kind(self.prior_kind)
        if self.prior_kind == "autoregressive":
            return self.prior.stage.settings(**{f: getattr(settings, f) for f in _AR_FIELDS})
        return resolve(settings, self.prior.config.diffusion, _DIFFUSION_FIELDS)

    # ------------------------------------------------------------------ programs
    def program(self, key: tuple, trained: load.Loaded, build: Callable[[], Callable]) -> Callable:
        """A cached jitted per-row program `(params, keys [B, k], *inputs [B, ...]) -> [B, ...]`.

        `build()` returns `f(params, rng, *rows)` on a batch of ONE row; the program vmaps it over
        rows (sharded over the data axes) under the stage's logical-axis rules, with the batch axis
        of the model's own activations unsharded (it has one row). `key[1]` is the stream id folded
        into each row's key; the rest of `key` names the settings the program was built for.
        """
        if key in self._programs:
            return self._programs[key]
        body = build()
        stream = key[1]

        def program(params, keys, *inputs):
            def one(raw_key, *row):
                rng = jax.random.fold_in(jax.random.wrap_key_data(raw_key), stream)
                out = body(params, rng, *(x[None] for x in row))
                return jax.tree.map(lambda o: o[0], out)

            return jax.vmap(one, spmd_axis_name=DATA_AXES)(keys, *inputs)

        jitted = jax.jit(program, out_shardings=NamedSharding(self.mesh, P()))
        rules = (("act_batch", None),) + tuple(trained.rules)

        def run(*args):
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
                return jitted(*args)

        self._programs[key] = run
        return run

    def map_rows(self, program: Callable, params, keys: np.ndarray, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Runs a `program` over host rows (keys [N, k] uint32, inputs [N, ...]) in sharded batches."""
        return parallel.map_batches(lambda _, k, *chunk: program(params, k, *chunk),
                                    [np.asarray(keys)] + [np.asarray(x) for x in inputs], self.mesh,
                                    self.batch_size)

    # ------------------------------------------------------------------ stages
    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> int32 tokens [N, L]; over-long captions are truncated (end-of-text token kept
        last) with a warning from the tokenizer."""
        return self.tokenizer(list(captions))

    def encode_text(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens int32 [N, L] -> (unit z_t [N, D], CLIP text hidden states float32 [N, L, W]);
        with Karlo stages z_t is the projected text embedding as it is (not normalised)."""
        return self._encode_captions(tokens)[:2]

    def _encode_captions(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`ClipStage.encode_captions` of this pipeline's CLIP: (z_t, hidden states, mask)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.clip.rules):
            # Karlo's stages take the projected text embedding as it is (not unit-normalised).
            return self.clip.stage.encode_captions(self.clip.params, self.mesh, tokens,
                                                   batch_size=self.batch_size,
                                                   normalize=not self.karlo)

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] (any size; resized to the CLIP's) -> unit z_i [N, D]; with
        Karlo stages the projected image embedding as it is (what Karlo's decoder takes)."""
        images = self.clip.stage.prepare_images(check_images(images))
        if not self.clip.stage.model.has_vision:
            hint = (" Import the full CLIP Karlo was trained with (openai/clip-vit-large-patch14): "
                    "convert_karlo.py --clip_dir=<its local copy>.") if self.karlo else ""
            raise _stage_error("clip", self.clip.workdir, "is a text encoder alone (no image tower): "
                               "it cannot embed images for variations, interpolations or text diffs." + hint)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.clip.rules):
            return self.clip.stage.embed(self.clip.params, self.mesh, images=images, batch_size=self.batch_size,
                                         normalize=not self.karlo)

    def sample_z_i(self, z_t: np.ndarray, text_hidden: np.ndarray, tokens: np.ndarray, keys: np.ndarray,
                   settings: PriorSettings | None = None, *, noise: tuple | None = None) -> np.ndarray:
        """The prior: unit z_i [N, D] from z_t [N, D], text hidden [N, L, W], tokens [N, L], row keys.

        The diffusion or the autoregressive prior (`prior_kind`), each one program per setting.
        Karlo stages: z_i as the decoder takes it (not unit); `noise` (see `generate_rows`)."""
        s = self._resolve_prior(settings or self.settings.prior)
        task = self.prior.stage
        if self.prior_kind == "autoregressive":
            self._refuse_noise(noise)
            key = ("ar_prior", PRIOR_STREAM, *(s[f] for f in _AR_FIELDS))

            def build_ar():
                body = task.sample_body(**s)
                return lambda params, rng, z_t, hidden, tok: body(params, z_t, hidden, tok, rng)

            return self.map_rows(self.program(key, self.prior, build_ar), self.prior.params, keys,
                                 [z_t.astype(np.float32), text_hidden.astype(np.float32), tokens])
        key = ("prior", PRIOR_STREAM, s["guidance_scale"], s["best_of"], s["sampler"], s["steps"])
        if self.karlo:
            if noise is not None and int(s["best_of"]) != 1:
                raise ValueError(f"fixed noise is given per row, for best_of=1 (got {s['best_of']})")

            def build_karlo():
                body = task.sample_body(guidance_scale=float(s["guidance_scale"]), best_of=int(s["best_of"]),
                                        sampler=s["sampler"], steps=s["steps"])
                return _with_noise(lambda params, rng, text, noise: body(params, *text, rng, *noise), 6)

            return self.map_rows(self.program(key + (noise is not None,), self.prior, build_karlo),
                                 self.prior.params, keys,
                                 self._karlo_text(z_t, text_hidden, tokens) + _noise_rows(noise))
        self._refuse_noise(noise)

        def build():
            body = task.sample_body(guidance_scale=float(s["guidance_scale"]), best_of=int(s["best_of"]),
                                    sampler=s["sampler"], steps=s["steps"])
            return lambda params, rng, z_t, hidden, tok: body(params, z_t, hidden, tok, rng)

        return self.map_rows(self.program(key, self.prior, build), self.prior.params, keys,
                         [z_t.astype(np.float32), text_hidden.astype(np.float32), tokens])

    def decode(self, z_i: np.ndarray, tokens: np.ndarray | None, keys: np.ndarray,
               settings: DecoderSettings | None = None, *, x_T: np.ndarray | None = None) -> np.ndarray:
        """The decoder: uint8 images [N, s, s, 3] from unit z_i [N, D] and caption tokens [N, L].

        tokens=None conditions on z_i alone (the caption dropped, as in the decoder's training).
        x_T [N, s, s, 3] (e.g. from `invert`) replaces the initial noise.
        """
        s = resolve(settings or self.settings.decoder, self.decoder.config.diffusion)
        task = self.decoder.stage
        use_text = tokens is not None
        if self.karlo:
            return np.asarray(pixels.to_uint8(
                self._karlo_decode(z_i, self._karlo_captions(tokens, len(z_i)), keys, s, x_T=x_T)))
        if tokens is None:
            tokens = np.zeros((len(z_i), task.text_length), np.int32)
        key = ("decoder", DECODER_STREAM, s["guidance_scale"], s["sampler"], s["steps"], s["eta"],
               use_text, x_T is not None)

        def build():
            body = task.sample_body(guidance_scale=float(s["guidance_scale"]), sampler=s["sampler"],
                                    steps=s["steps"], eta=s["eta"], drop_text=not use_text)
            return lambda params, rng, z, tok, *x: pixels.to_uint8(body(params, z, tok, rng, *x))

        inputs = [np.asarray(z_i, np.float32), np.asarray(tokens, np.int32)]
        if x_T is not None:
            inputs.append(np.asarray(x_T, np.float32))
        return self.map_rows(self.program(key, self.decoder, build), self.decoder.params, keys, inputs)

    # ------------------------------------------------------------------ Karlo stages
    def _uncond_text(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The empty caption's (z_t [1, D], hidden [1, L, W], mask [1, L]): Karlo's guidance input."""
        if not hasattr(self, "_uncond"):
            self._uncond = self._encode_captions(self.tokenize([""]))
        return self._uncond

    def _karlo_text(self, z_t: np.ndarray, hidden: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
        """Per-row inputs of a Karlo stage: the caption's z_t, hidden states, mask, then the empty
        caption's three (repeated on every row)."""
        n = len(z_t)
        uncond = [np.repeat(u, n, axis=0) for u in self._uncond_text()]
        mask = text_mask(np.asarray(tokens), self.clip.stage.sizes["eot_token_id"])
        return [np.asarray(z_t, np.float32), np.asarray(hidden, np.float32), mask, *uncond]

    def _karlo_captions(self, tokens: np.ndarray | None, n: int) -> list[np.ndarray]:
        """`_karlo_text` of N rows' caption tokens, encoded here (None: the empty caption on every
        row, as Karlo has no learned null caption)."""
        if tokens is None:
            tokens = np.repeat(self.tokenize([""]), n, axis=0)
        z_t, hidden = self.encode_text(tokens)
        return self._karlo_text(z_t, hidden, tokens)

    def _karlo_decode(self, z_i, captions: list[np.ndarray], keys, s, *, x_T=None, noise=None) -> np.ndarray:
        """The Karlo decoder over rows: float32 images [N, s, s, 3] in [-1, 1], conditioned on z_i
        and `captions` (`_karlo_text` / `_karlo_captions`); x_T or `noise` (see `generate_rows`)
        replace the drawn noise."""
        task = self.decoder.stage
        if x_T is not None:
            noise = (x_T, None)
        key = ("decoder", DECODER_STREAM, s["guidance_scale"], s["sampler"], s["steps"], s["eta"],
               None if noise is None else noise[1] is None)

        def build():
            body = task.sample_body(guidance_scale=float(s["guidance_scale"]), sampler=s["sampler"],
                                    steps=s["steps"], eta=s["eta"])
            return _with_noise(lambda params, rng, inputs, noise: body(params, *inputs, rng, *noise), 7)

        return self.map_rows(self.program(key, self.decoder, build), self.decoder.params, keys,
                             [np.asarray(z_i, np.float32), *captions] + _noise_rows(noise))

    def _refuse_noise(self, noise) -> None:
        if noise is not None:
            raise ValueError("fixed step noise (`noise`) is for imported Karlo stages only; this "
                             "project's samplers take x_T")

    def invert(self, images: np.ndarray, z_i: np.ndarray, tokens: np.ndarray | None,
               settings: DecoderSettings | None = None, *, num_fixed_point_iters: int = 0) -> np.ndarray:
        """DDIM inversion through the decoder: x_T float32 [N, s, s, 3] of uint8 images [N, s, s, 3].

        Uses the decoder's guidance scale and steps of `settings` (and its caption conditioning:
        tokens=None drops the caption), so `decode(..., x_T=x_T)` with DDIM at eta = 0 and the same
        settings reconstructs the images.
        """
        images = check_images(images)
        s = resolve(settings or self.settings.decoder, self.decoder.config.diffusion)
        task = self.decoder.stage
        images = resize(images, task.side)
        if self.karlo:
            return self._karlo_invert(images, z_i, tokens, s, int(num_fixed_point_iters))
        use_text = tokens is not None
        if tokens is None:
            tokens = np.zeros((len(z_i), task.text_length), np.int32)
        key = ("invert", DECODER_STREAM, s["guidance_scale"], s["steps"], use_text, int(num_fixed_point_iters))

        def build():
            body = task.invert_body(guidance_scale=float(s["guidance_scale"]), steps=s["steps"],
                                    num_fixed_point_iters=int(num_fixed_point_iters), drop_text=not use_text)
            return lambda params, rng, x, z, tok: body(params, pixels.to_model_range(x), z, tok)

        return self.map_rows(self.program(key, self.decoder, build), self.decoder.params,
                             _unused_keys(len(images)),
                             [images, np.asarray(z_i, np.float32), np.asarray(tokens, np.int32)])

    def _karlo_invert(self, images, z_i, tokens, s, num_fixed_point_iters):
        """`invert` with Karlo stages (tokens None: the empty caption in both halves)."""
        key = ("invert", DECODER_STREAM, s["guidance_scale"], s["steps"], num_fixed_point_iters)

        def build():
            body = self.decoder.stage.invert_body(guidance_scale=float(s["guidance_scale"]), steps=s["steps"],
                                                  num_fixed_point_iters=num_fixed_point_iters)
            return lambda params, rng, x, *inputs: body(params, pixels.to_model_range(x), *inputs)

        return self.map_rows(self.program(key, self.decoder, build), self.decoder.params,
                             _unused_keys(len(images)),
                             [images, np.asarray(z_i, np.float32), *self._karlo_captions(tokens, len(z_i))])

    def upsample(self, images: np.ndarray, keys: np.ndarray, settings: UpsamplerSettings | None = None,
                 *, stages: Sequence[int] | None = None, noise: tuple | None = None) -> np.ndarray:
        """Runs the upsamplers (all, or the indices `stages`) on uint8 images [N, s, s, 3].

        Karlo stages also take the decoder's float32 images in [-1, 1], as diffusers hands them on,
        and `noise` (see `generate_rows`)."""
        images = np.asarray(images)
        if noise is not None and not self.karlo:
            self._refuse_noise(noise)
        for j in (range(len(self.upsamplers)) if stages is None else stages):
            up = self.upsamplers[j]
            s = resolve(settings or self.settings.upsampler, up.config.diffusion)
            key = ("upsampler", UPSAMPLER_STREAM + j, s["sampler"], s["steps"], s["eta"], noise is not None)

            def build(up=up, s=s):
                body = up.stage.sample_body(sampler=s["sampler"], steps=s["steps"], eta=s["eta"])
                return _with_noise(lambda params, rng, low, noise:
                                   pixels.to_uint8(body(params, *low, rng, *noise)), 1)

            images = self.map_rows(self.program(key, up, build), up.params, keys, [images] + _noise_rows(noise))
        return images

    # ------------------------------------------------------------------ end to end
    def generate_rows(self, captions: Sequence[str], keys: np.ndarray, settings: Settings | None = None,
                      *, noise: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Samples:
        """Text -> images for rows (one caption and one key per row; see `row_keys`).

        Karlo stages: the decoder's float images go to the super-resolution unrounded (as in
        diffusers' `UnCLIPPipeline`), and `noise` may replace every draw (to reproduce another
        implementation's samples): {"prior" | "decoder" | "upsampler": (x_T [N, ...],
        step_noise [N, steps - 1, ...])}, per row, in the stages' NHWC layout.
        """
        settings = settings or self.settings
        captions = [str(c) for c in captions]
        if len(captions) != len(keys):
            raise ValueError(f"got {len(captions)} captions but {len(keys)} keys")
        if not captions:
            raise ValueError("captions is empty: give at least one caption")
        unique = list(dict.fromkeys(captions))
        index = np.array([unique.index(c) for c in captions])
        tokens = self.tokenize(unique)
        z_t, hidden = self.encode_text(tokens)
        tokens, z_t, hidden = tokens[index], z_t[index], hidden[index]
        noise = dict(noise or {})
        if set(noise) - {"prior", "decoder", "upsampler"}:
            raise ValueError(f"noise: unknown stages {sorted(set(noise) - {'prior', 'decoder', 'upsampler'})}")
        z_i = self.sample_z_i(z_t, hidden, tokens, keys, settings.prior, noise=noise.get("prior"))
        if self.karlo:
            s = resolve(settings.decoder, self.decoder.config.diffusion)
            base = self._karlo_decode(z_i, self._karlo_text(z_t, hidden, tokens), keys, s,
                                      noise=noise.get("decoder"))
            images = self.upsample(base, keys, settings.upsampler, noise=noise.get("upsampler"))
            base = np.asarray(pixels.to_uint8(base))
        else:
            self._refuse_noise(noise or None)
            base = self.decode(z_i, tokens, keys, settings.decoder)
            images = self.upsample(base, keys, settings.upsampler)
        n = len(captions)
        return Samples(images=images, base_images=base, z_i=z_i, captions=captions,
                       prompt_index=np.full(n, -1), sample_index=np.full(n, -1))

    def generate(self, prompts: Sequence[str], *, seed: int = 0, num_per_prompt: int = 1,
                 settings: Settings | None = None) -> Samples:
        """Samples `num_per_prompt` images per prompt; rows are prompt-major (see `Samples`)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single string; wrap it in a list")
        if isinstance(num_per_prompt, bool) or int(num_per_prompt) < 1:
            raise ValueError(f"num_per_prompt={num_per_prompt!r}: expected an int >= 1")
        prompts = list(prompts)
        p = np.repeat(np.arange(len(prompts)), num_per_prompt)
        k = np.tile(np.arange(num_per_prompt), len(prompts))
        out = self.generate_rows([prompts[i] for i in p], row_keys(seed, p, k), settings)
        out.prompt_index, out.sample_index = p, k
        return out


def _unused_keys(n: int) -> np.ndarray:
    """Row keys [n, key_words] for a deterministic program (DDIM inversion draws nothing)."""
    return np.zeros((n, jax.random.key_data(jax.random.key(0)).shape[-1]), np.uint32)


def _noise_rows(noise: tuple | None) -> list[np.ndarray]:
    """Per-row fixed noise (x_T [N, ...], step_noise [N, steps - 1, ...] or None) as row inputs."""
    return [] if noise is None else [np.asarray(a, np.float32) for a in noise if a is not None]


def _with_noise(body: Callable, num_inputs: int) -> Callable:
    """A `program` body `(params, rng, *rows)` from `body(params, rng, inputs, noise)`: rows past
    the first `num_inputs` are fixed noise, x_T [1, ...] then step_noise [1, steps - 1, ...],
    handed on as the samplers take them (step_noise [steps - 1, 1, ...])."""
    def run(params, rng, *rows):
        inputs, noise = rows[:num_inputs], list(rows[num_inputs:])
        if len(noise) == 2:
            noise[1] = jnp.swapaxes(noise[1], 0, 1)
        return body(params, rng, inputs, noise)

    return run


def check_images(images) -> np.ndarray:
    """uint8 [N, H, W, 3] (a single [H, W, 3] image becomes N = 1), with a clear error otherwise."""
    return image_lib.check_image_batch(images)


def resize(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, side, side, 3] (bicubic, antialiased; centre crop if not square)."""
    if images.shape[1:3] == (side, side):
        return images
    return np.stack([image_lib.resize_center_crop(x, side) for x in images])


def slerp(a: np.ndarray, b: np.ndarray, theta) -> np.ndarray:
    """Spherical interpolation between a and b [..., D] at fractions theta (scalar or [...]).

    sin((1 - theta) omega) / sin(omega) a + sin(theta omega) / sin(omega) b, omega the angle
    between a and b (linear when they are parallel). Unit vectors stay unit vectors; for Gaussian
    latents (flattened x_T) the norm stays about constant. Returns float32 [..., D].
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    theta = np.asarray(theta, np.float64)[..., None]
    na, nb = np.linalg.norm(a, axis=-1, keepdims=True), np.linalg.norm(b, axis=-1, keepdims=True)
    cos = np.clip(np.sum(a * b, -1, keepdims=True) / np.maximum(na * nb, 1e-12), -1.0, 1.0)
    omega = np.arccos(cos)
    so = np.sin(omega)
    near = so < 1e-6
    safe = np.where(near, 1.0, so)
    wa = np.where(near, 1.0 - theta, np.sin((1.0 - theta) * omega) / safe)
    wb = np.where(near, theta, np.sin(theta * omega) / safe)
    return (wa * a + wb * b).astype(np.float32)

"""Text -> image: the public Pipeline (README "Python API", docs/conventions.md). Builds from one original-layout checkpoint,
stacks LoRAs by task arithmetic (LCM-LoRA report Eqs. 2-3) and samples with LCM, DDIM or
DPM-Solver(++) through the model-agnostic solvers."""
import copy
import logging
import numbers
import os

import torch
from tqdm.auto import tqdm

from lcm.conditioning import unconditional, with_vector
from lcm.consistency import ConsistencySpec
from lcm.denoiser import denoiser
from lcm.sampling import samplers
from lcm.sampling.guards import (as_image_tensor, check_init_image, check_latents, check_memory,
                                 warn_control_characters)
from models import checkpoint as ckpt
from models import lora as lora_lib
from models import lora_io
from models.text import Conditioning
from solvers.noise import randn
from solvers.schedule import Schedule, on_lcm_grid
from solvers.wrappers import GuidedModel, lcm_w

log = logging.getLogger(__name__)

DEFAULT_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024, "ssd1b": 1024}
PREDICTION_TYPES = ckpt.PREDICTION_TYPES


class Pipeline:
    """Stable Diffusion (SD1/SD2/SDXL/SSD-1B/demo) with LoRA stacking and few-step solvers."""

    def __init__(self, unet, vae, text, family: str, prediction_type: str = "epsilon",
                 schedule: Schedule | None = None, spec: ConsistencySpec | None = None,
                 config: dict | None = None, device="cpu", dtype=torch.float32):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet, self.vae, self.text = unet.eval(), vae.eval(), text.eval()
        self.family, self.prediction_type = family, prediction_type
        self.schedule = schedule or Schedule.make()
        self.base_spec = spec or ConsistencySpec()     # a full LCM's own spec, else the default grid
        self.adapter_specs: dict[str, ConsistencySpec] = {}   # LCM-style adapters: the spec they carry
        self.config = dict(config or {})
        self.device, self.dtype = torch.device(device), dtype
        self.default_size = self.config.get("default_size", DEFAULT_SIZE.get(family, 512))
        for p in [*unet.parameters(), *vae.parameters(), *text.parameters()]:
            p.requires_grad_(False)

    #------------------------------------------------------------------------
    # Building.

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32, prediction_type=None,
                        vae_dtype=None) -> "Pipeline":
        """Load an original single-file checkpoint (.safetensors, or .ckpt read weights-only)."""
        sd, meta = ckpt.load_file(path)
        c = ckpt.build_components(sd, meta, dtype=dtype)
        del sd
        pred = prediction_type or meta.get("prediction_type") or c.config.get("prediction_type")
        if pred is None:
            pred = "v_prediction" if c.family == "sd21" else "epsilon"
            if c.family == "sd21":
                log.warning("SD2.x weights cannot tell v-prediction (768-v) from epsilon (512-base); "
                            "assuming v_prediction. Pass prediction_type='epsilon' (sample.py: "
                            "model.prediction_type=epsilon) for the base models.")
        spec = ConsistencySpec.from_metadata(meta) if "lcm.spec" in meta else None
        if vae_dtype is None:                 # SDXL's VAE overflows in fp16: keep VAEs in fp32
            vae_dtype = torch.float32
        pipe = cls(c.unet, c.vae.to(vae_dtype), c.text, c.family, pred, spec=spec, config=c.config,
                   device=device, dtype=dtype)
        return pipe.to(device)

    @classmethod
    def from_architecture(cls, family: str, unet: dict, vae: dict, text: dict, prediction_type: str = "epsilon",
                          dtype=torch.float32, seed: int = 0, randomize: bool = False, **config) -> "Pipeline":
        """A freshly initialised model from the modules' kwargs (a from-scratch run such as the demo
        teacher, or a tiny test model); the kwargs (and `config` extras such as default_size or
        text_family) are kept in `pipe.config`, so a saved file rebuilds it. randomize: perturb every
        UNet weight by 0.05 N(0, 1) (LDM's init zeroes output layers: a usable random teacher)."""
        from models.text import TextConditioner
        from models.unet import UNetModel
        from models.vae import AutoencoderKL
        torch.manual_seed(seed)
        u, v, t = UNetModel(**unet), AutoencoderKL(**vae), TextConditioner(**text)
        if randomize:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in u.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g, device="cpu"))
        config = dict(family=family, text_family=family, unet=unet, vae=vae, text=text) | config
        return cls(u.to(dtype), v, t.to(dtype), family, prediction_type or "epsilon", config=config, dtype=dtype)

    def load_loras(self, items) -> list[str]:
        """Load a config's LoRA list in order: paths, or {path, name?, scale?} dicts; returns the names."""
        names = []
        for item in items or []:
            spec = {"path": item} if isinstance(item, str) else dict(item)
            if "path" not in spec:
                raise ValueError(f"LoRA entries need a path, got {spec}")
            names.append(self.load_lora(spec["path"], name=spec.get("name"), scale=float(spec.get("scale", 1.0))))
            log.info("loaded LoRA %s as %r (scale %s)", spec["path"], names[-1], spec.get("scale", 1.0))
        return names

    def compile(self, mode: str | None = None, vae: bool = True) -> "Pipeline":
        """torch.compile the UNet (and the VAE decoder) in place: keys, LoRA calls and fusing work as
        before. The first call at a new shape/batch/LoRA set compiles (slow); later calls are fast.
        Needs a C++ compiler on CPU. mode: None | "reduce-overhead" | "max-autotune"."""
        self.unet.compile(mode=mode, dynamic=False)
        if vae:
            self.vae.decoder.compile(mode=mode, dynamic=False)
        return self

    def to(self, device) -> "Pipeline":
        self.device = torch.device(device)
        for m in (self.unet, self.vae, self.text):
            m.to(self.device)
        return self

    def replace(self, **components) -> "Pipeline":
        """A view of this pipeline with some components swapped (unet, spec, schedule, ...), sharing
        the rest: the trainer samples its student / EMA / teacher through views, never mutating."""
        unknown = [k for k in components if not hasattr(self, k)]
        if unknown:
            raise ValueError(f"Pipeline.replace: unknown components {sorted(unknown)}")
        view = copy.copy(self)
        view.adapter_specs = dict(self.adapter_specs)
        for k, v in components.items():
            setattr(view, k, v)
        return view

    def file_config(self, unet=None) -> dict:
        """What a saved full model needs to rebuild itself (its `lcm.config`), for `unet` (default:
        this pipeline's; e.g. a distilled student with a w-embedding)."""
        unet = unet or self.unet
        cfg = dict(family=self.family, text_family=self.config.get("text_family", self.family),
                   unet={**self.config["unet"], "time_cond_proj_dim": unet.time_cond_proj_dim},
                   vae=self.config["vae"])
        return cfg | ({"default_size": self.config["default_size"]} if "default_size" in self.config else {})

    @property
    def vae_scale(self) -> float:
        return self.vae.scale_factor

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel (8 for every SD VAE)."""
        return 2 ** (len(self.vae.ch_mult) - 1)

    @property
    def is_full_lcm(self) -> bool:
        """A full LCM carries the guidance (w) embedding projection."""
        return getattr(self.unet, "time_cond_proj", None) is not None

    #------------------------------------------------------------------------
    # Conditioning.

    @torch.no_grad()
    def encode_prompt(self, prompts) -> Conditioning:
        """Prompts -> Conditioning(context (B,77,D), pooled (B,1280) or None)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self.text.encode(prompts)
        return Conditioning(cond.context.to(self.device, self.dtype),
                            None if cond.pooled is None else cond.pooled.to(self.device, self.dtype))

    #------------------------------------------------------------------------
    # LoRA: task arithmetic W = W0 + sum_i scale_i * (alpha_i / r_i) * B_i A_i.

    def load_lora(self, path, name=None, scale: float = 1.0, strict: bool = True) -> str:
        """Load a LoRA file in any supported format as a named adapter; returns the name. A file
        with `lcm.spec` metadata (this project's exports) is an LCM-style adapter: LCM sampling
        uses its grid and scalings while it is active (see `spec`)."""
        rep = lora_io.load_lora(self.unet, path, name=name, scale=scale, strict=strict,
                                text_encoders=list(self.text.towers), dtype=self.dtype)
        try:
            spec = ConsistencySpec.from_metadata(rep.metadata)
        except ValueError as e:                  # junk spec metadata: nothing stays loaded
            for m in (self.unet, self.text):
                if rep.name in lora_lib.lora_names(m):
                    lora_lib.remove_lora(m, rep.name)
            msg = str(e)
            raise ValueError(msg if os.fspath(path) in msg else f"{path}: {msg}") from None
        if spec is not None:
            self.adapter_specs[rep.name] = spec
        return rep.name

    @property
    def spec(self) -> ConsistencySpec:
        """The consistency spec LCM sampling uses now: that of the active LCM-style adapter (loaded
        from a file with an `lcm.spec`, or trained here), else the model's own (`base_spec`: a full
        LCM's, or the default N = 50 that the released LCM-LoRA files assume). Two active adapters
        with different specs are an error naming both."""
        scales = self.adapter_scales()
        active = {n: sp for n, sp in self.adapter_specs.items() if scales.get(n, 0.0) != 0.0}
        if len(set(active.values())) > 1:
            raise ValueError("active LCM-style adapters disagree on their spec: " + "; ".join(
                f"{n}: {sp}" for n, sp in active.items()) + ". Set one's scale to 0 (set_lora_scales)")
        return next(iter(active.values()), self.base_spec)

    @spec.setter
    def spec(self, spec: ConsistencySpec) -> None:
        self.base_spec = spec

    def adapter_scales(self) -> dict[str, float]:
        """Adapter name -> its scale on the UNet (the first layer that holds it)."""
        scales = {}
        for _, m in lora_lib.lora_layers(self.unet):
            for n, v in m.lora_scale.items():
                scales.setdefault(n, v)
        return scales

    def lora_names(self) -> list[str]:
        """Adapters loaded in the UNet or the text encoders (a text-only LoRA included)."""
        return list(dict.fromkeys(lora_lib.lora_names(self.unet) + lora_lib.lora_names(self.text)))

    def set_lora_scales(self, scales: dict) -> None:
        """Set runtime scales by adapter name; a fused model is re-fused so outputs follow."""
        unknown = set(scales) - set(self.lora_names())
        if unknown:
            raise ValueError(f"unknown adapters {sorted(unknown)}; loaded: {self.lora_names()}")
        for m in (self.unet, self.text):
            present = set(lora_lib.lora_names(m))
            lora_lib.set_lora_scales(m, {k: v for k, v in scales.items() if k in present})

    def fuse_lora(self) -> None:
        """Bake the current scales into the weights; unfuse_lora restores W0 bit for bit."""
        lora_lib.fuse_lora(self.unet)

    def unfuse_lora(self) -> None:
        lora_lib.unfuse_lora(self.unet)

    def save_lora(self, path, name: str, format: str = "kohya", overwrite: bool = False) -> str:
        """Write adapter `name` as trained (rank, alpha, weights) in 'kohya' or 'peft' layout."""
        meta = {"lcm.family": self.family}
        if name in self.adapter_specs or name == "lcm":          # an LCM-style adapter carries its spec
            meta |= self.adapter_specs.get(name, self.base_spec).to_metadata()
        return lora_io.save_lora(self.unet, path, name, format=format, overwrite=overwrite, metadata=meta)

    def is_lcm_style(self, name: str) -> bool:
        """An LCM-style adapter: named 'lcm', or carrying a consistency spec (a few-step sampler's weights)."""
        return name == "lcm" or name in self.adapter_specs

    def _lcm_lora_active(self) -> bool:
        """An LCM-style adapter is loaded with a non-zero scale."""
        return any(v != 0.0 and self.is_lcm_style(n) for n, v in self.adapter_scales().items())

    #------------------------------------------------------------------------
    # Sampling.

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, steps: int = 4, guidance_scale: float = 1.0,
                 solver: str = "lcm", timesteps=None, height=None, width=None, seed=None,
                 generator=None, latents=None, init_image=None, strength: float = 1.0,
                 output: str = "pil", progress: bool = True, eta: float | None = None,
                 spacing: str | None = None):
        """Generate images. See the README's Python API for the meaning of every argument."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width = height or self.default_size, width or self.default_size
        self._check_args(prompts, steps, guidance_scale, solver, timesteps, height, width,
                         strength, output, init_image)
        sampler = samplers.get(solver)
        eta = self._check_eta_spacing(sampler, eta, spacing)
        B = len(prompts)
        if seed is not None:                 # per-image generators: an image reproduces at any batch size
            generator = [torch.Generator().manual_seed(int(seed) + i) for i in range(B)]
        model = self.denoiser(prompts, negative_prompt, float(guidance_scale), height, width)

        ts = self._timesteps(sampler, steps, timesteps, strength if init_image is not None else 1.0, spacing)
        f = self.latent_factor
        shape = (B, self.unet.in_channels, height // f, width // f)
        z0 = None
        if init_image is not None:
            z0 = self._encode_image(init_image, B, generator)
        if latents is None:
            latents = randn(shape, generator, device=self.device, dtype=torch.float32)
        else:
            check_latents(latents, shape)
        x = latents.to(self.device, torch.float32)
        if z0 is not None:                    # img2img: noise the image latent to the first timestep
            x = self.schedule.alpha(ts[0]) * z0 + self.schedule.sigma(ts[0]) * x
        elif sampler.start is not None:
            x = sampler.start(x, ts[0], self.schedule, spacing)
        bar = tqdm(total=len(ts), disable=not progress, desc=f"{solver} {len(ts)} steps", leave=False)
        opts = samplers.Options(self.spec, eta, spacing, generator, callback=lambda *_: bar.update(1))
        out = sampler.run(model, x, ts, self.schedule, opts)
        bar.close()
        return self._output(out, output)

    def denoiser(self, prompts: list[str], negative_prompt=None, guidance_scale: float = 1.0,
                 height: int | None = None, width: int | None = None) -> GuidedModel:
        """The guided UNet for these prompts, as the solvers call it (.eps / .x0): CFG against the
        negative prompts (or the family's unconditional branch) at s != 1; a full LCM embeds w = s - 1
        and runs one pass."""
        height, width = height or self.default_size, width or self.default_size
        B, s = len(prompts), float(guidance_scale)
        cond, uncond, w = self.encode_prompt(prompts), None, None
        if self.is_full_lcm:                 # guidance is distilled in: embed w = s - 1, one pass
            if negative_prompt is not None:
                raise ValueError("this model distils CFG against the empty prompt; negative prompts "
                                 "are not supported")
            w, s = torch.full((B,), lcm_w(s), device="cpu"), 1.0
        elif s != 1.0:
            neg = None if negative_prompt is None else (
                [negative_prompt] * B if isinstance(negative_prompt, str) else list(negative_prompt))
            uncond = unconditional(self.encode_prompt, self.family, cond, neg)
        elif negative_prompt is not None:
            log.warning("negative_prompt is ignored at guidance_scale=1")
        vec = lambda c: with_vector(c, [(height, width)] * B, [(0, 0)] * B, (height, width))
        return denoiser(self.unet, self.prediction_type, self.schedule, vec(cond),
                        None if uncond is None else vec(uncond), s, w, self.dtype)

    def _check_eta_spacing(self, sampler: samplers.Sampler, eta, spacing) -> float:
        """The sampler's eta (None: its default), checked; spacing only where a sampler has one."""
        takes_eta = sorted(n for n, r in samplers.SAMPLERS.items() if r.eta is not None)
        if eta is not None and sampler.eta is None and float(eta) != 0.0:
            raise ValueError(f"eta={eta} applies to " + " or ".join(f"solver={n}" for n in takes_eta) +
                             f" (DDIM's eta, TCD's gamma), not solver={sampler.name}")
        eta = float((sampler.eta or 0.0) if eta is None else eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if spacing is not None and (spacing not in samplers.SPACINGS or sampler.few_step):
            raise ValueError(f"spacing={spacing!r}: solver={sampler.name} " + (
                "takes its grid from the weights' spec (no spacing)" if sampler.few_step
                else f"spaces its timesteps by one of {', '.join(samplers.SPACINGS)}"))
        if sampler.few_step and (sp := self.spec).objective != sampler.name and self._lcm_lora_active():
            log.warning("the active adapter was distilled with %s; sample it with solver=%s, not %s",
                        sp.objective.upper(), sp.objective, sampler.name)
        return eta

    def _timesteps(self, sampler: samplers.Sampler, steps, timesteps, strength, spacing=None) -> list[int]:
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(a <= b for a, b in zip(ts, ts[1:])) or not all(0 <= t < 1000 for t in ts):
                raise ValueError(f"timesteps must be strictly descending integers in [0, 999], got {ts}")
            if sampler.k_grid and not on_lcm_grid(ts, self.spec.num_ddim_timesteps):
                log.warning("timesteps %s are not all on the %d-point LCM training grid", ts,
                            self.spec.num_ddim_timesteps)
            return ts
        if sampler.steps_hint and steps > sampler.steps_hint and self._lcm_lora_active():
            log.warning("LCM-LoRA is distilled for 1-%d steps; %d steps rarely helps", sampler.steps_hint, steps)
        ts = sampler.grid(steps, self.spec, spacing, strength)
        if sampler.k_grid:                   # the k-grid rule cuts for img2img itself
            return ts
        if strength < 1.0:                   # img2img: start part-way down the same list
            k = min(int(steps * strength), steps)
            if k < 1:
                raise ValueError(f"strength {strength} with {steps} steps runs 0 steps; raise "
                                 f"strength to at least {1 / steps:.3f} or use more steps")
            ts = ts[steps - k:]
            log.info("img2img: %d of %d steps run (strength %.2f)", k, steps, strength)
        return ts

    def _encode_image(self, image, B, generator) -> torch.Tensor:
        img = as_image_tensor(image).to(self.device)
        if img.shape[0] == 1 and B > 1:
            img = img.expand(B, -1, -1, -1)
        post = self.vae.encode(img.to(next(self.vae.parameters()).dtype))
        g = generator if not isinstance(generator, list) else generator[0]
        return (post.sample(generator=g).float() * self.vae_scale)

    tiny_vae = None        # a TinyAutoencoder (models/taesd.py) that decode() uses instead of the VAE

    def load_tiny_vae(self, path, dtype=None) -> "Pipeline":
        """Decode with TAESD from now on (`tiny_vae = None` goes back to the VAE): a taesd_decoder /
        taesdxl_decoder file (.safetensors or .pth) or diffusers' AutoencoderTiny safetensors. It
        must fit the UNet's latents (channels, downscale); dtype defaults to the pipeline's."""
        from models.taesd import load_tiny_vae
        tiny = load_tiny_vae(path)
        if tiny.decoder is None:
            raise ValueError(f"{path} holds a TAESD encoder only; decoding needs the decoder (taesd_decoder.*)")
        if (tiny.latent_channels, tiny.downscale) != (self.unet.in_channels, self.latent_factor):
            raise ValueError(f"{path}: this TAESD decodes {tiny.latent_channels}-channel latents x{tiny.downscale}, "
                             f"but this {self.family} model's are {self.unet.in_channels}-channel x{self.latent_factor}")
        name, xl = os.path.basename(os.fspath(path)).lower(), self.family in ("sdxl", "ssd1b")
        if ("taesdxl" in name) != xl and "taesd" in name:          # same shapes, other latent space
            log.warning("%s looks like a TAESD for %s latents, but this is a %s model: images will be off",
                        path, "SDXL" if "taesdxl" in name else "SD1/SD2", self.family)
        self.tiny_vae = tiny.to(self.device, dtype or self.dtype).requires_grad_(False)
        return self

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """UNet-space latent (B,4,h,w) -> images in [0, 1] (B,3,H,W), checked for NaN/Inf. The VAE
        decodes z / vae_scale; a tiny VAE (TAESD, scale factor 1) decodes z itself."""
        if self.tiny_vae is not None:
            img = self.tiny_vae.to(z.device).decode(z).float()
        else:
            vae_dtype = next(self.vae.parameters()).dtype
            img = self.vae.decode((z / self.vae_scale).to(vae_dtype)).float()
        if not torch.isfinite(img).all():
            raise FloatingPointError("the VAE decode produced NaN/Inf (the SDXL VAE overflows in "
                                     "fp16): keep the VAE in fp32 (vae_dtype=torch.float32) or use "
                                     "an fp16-fixed VAE")
        return ((img + 1) / 2).clamp(0, 1)

    def _output(self, z, output):
        if output == "latent":
            return z
        img = self.decode(z)
        if output == "tensor":
            return img
        from PIL import Image
        arr = (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    def _check_args(self, prompts, steps, s, solver, timesteps, height, width, strength, output,
                    init_image):
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        warn_control_characters(prompts)
        sampler = samplers.get(solver)
        if timesteps is None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not (0.0 <= float(s) <= 30.0):
            raise ValueError(f"guidance_scale must be in [0, 30] (1.0 = no guidance), got {s}")
        if not (0.0 < float(strength) <= 1.0):
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if output not in ("pil", "latent", "tensor"):
            raise ValueError(f"output must be 'pil', 'latent' or 'tensor', got {output!r}")
        m = self.latent_factor * 2 ** (len(self.unet.channel_mult) - 1)
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (height, width)):
            raise ValueError(f"height and width must be integers, got {height!r}x{width!r}")
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {m} for this model, "
                             f"got {height}x{width}")
        check_memory(self, len(prompts), int(height), int(width), output, s)
        if init_image is not None:
            check_init_image(init_image, len(prompts), int(height), int(width))
        if sampler.guidance_hint and self._lcm_lora_active() and s > sampler.guidance_hint:
            log.warning("LCM-LoRA with guidance_scale %.1f > %g tends to burn or blacken images; "
                        "the guidance is distilled in, use 1.0-%g", s, sampler.guidance_hint, sampler.guidance_hint)

"""The rows of a sample.py run: one (solver, steps) setting each, the configured solver alone or a
solvers x steps grid; their labels, UNet evaluations (NFE) and the contact sheet of their images.

A grid is fair: solvers that are not LCM-style run as the teacher (LCM-style adapters at 0, style
LoRAs kept, their preset's CFG / eta / spacing). The config is a mapping (a dict, or sample.py's
DictConfig) with conf/sample.yaml's keys."""
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lcm.sampling import infotext, samplers

if TYPE_CHECKING:
    from PIL import Image

    from lcm.pipeline import Pipeline

log = logging.getLogger(__name__)

#----------------------------------------------------------------------------
# Planning.

@dataclass
class Row:
    solver: str
    steps: int
    guidance_scale: float
    eta: float | None
    spacing: str | None
    scales: dict          # adapter name -> scale for this row
    teacher: bool         # LCM-style adapters switched off


def prompt_list(prompt: str | list[str], images_per_prompt: int) -> list[str]:
    """The prompts of one row (a string or a list), each repeated images_per_prompt times; image i of a
    row has seed seed + i."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [p for p in prompts for _ in range(int(images_per_prompt))]


def solver_preset(conf_dir: str, solver: str) -> dict:
    """guidance_scale / eta / spacing of the solver's preset, conf/solver/<solver>.yaml."""
    p = samplers.load_preset(conf_dir, solver)
    return dict(guidance_scale=float(p["guidance_scale"]), eta=p.get("eta"), spacing=p.get("spacing"))


def plan_rows(cfg: Mapping, pipe: "Pipeline", loras: list[dict], conf_dir: str) -> list[Row]:
    """The rows to sample: the configured solver alone, or the grid's solvers x steps. loras: the
    [{name, path, scale}] loaded; conf_dir: where the solver presets are. Logs the LCM spec an lcm
    row samples with."""
    solver, grid, timesteps = cfg["solver"], cfg["grid"], cfg["timesteps"]
    if "lcm" in (grid or {}).get("solvers", [solver["name"]]):
        sp = pipe.spec                               # the active LCM-style adapter's, else the model's own
        log.info("LCM spec: %d-point grid (k = %d), sigma_data %g, timestep_scaling %g", sp.num_ddim_timesteps,
                 pipe.schedule.T // sp.num_ddim_timesteps, sp.sigma_data, sp.timestep_scaling)
    base = {lo["name"]: lo["scale"] for lo in loras}
    own = dict(guidance_scale=float(cfg["guidance_scale"]), eta=solver.get("eta"), spacing=solver.get("spacing"))
    if grid is None:
        steps = int(cfg["steps"]) if timesteps is None else len(timesteps)   # explicit timesteps win
        return [Row(solver["name"], steps, **own, scales=base, teacher=False)]
    if timesteps is not None:
        raise ValueError("timesteps= and grid= conflict: the grid sets the steps of each row; drop timesteps")
    lcm_style = {n for n in base if pipe.is_lcm_style(n)}
    rows = []
    for name in grid["solvers"]:
        teacher = not samplers.get(name).few_step
        scales = {n: (0.0 if teacher and n in lcm_style else s) for n, s in base.items()}
        preset = own if name == solver["name"] else solver_preset(conf_dir, name)
        rows += [Row(name, int(steps), **preset, scales=scales, teacher=teacher and bool(lcm_style))
                 for steps in grid["steps"]]
    return rows

#----------------------------------------------------------------------------
# Labels and the contact sheet.

def nfe(pipe: "Pipeline", row: Row) -> int:
    """UNet evaluations per image: steps x solver order (singlestep DPM-Solver-2: 2) x 2 with CFG."""
    cfg_passes = 2 if row.guidance_scale != 1.0 and not pipe.is_full_lcm else 1
    return row.steps * samplers.get(row.solver).nfe_per_step * cfg_passes


def row_label(pipe: "Pipeline", row: Row) -> str:
    """The grid's left-margin label of a row."""
    return "\n".join([row.solver, f"{row.steps} step" + ("s" if row.steps != 1 else ""), f"NFE {nfe(pipe, row)}",
                      f"CFG {infotext.number(row.guidance_scale)}"] + (["no LCM-LoRA"] if row.teacher else []))


def contact_sheet(rows: list[list["Image.Image"]], labels: list[str] | None = None) -> "Image.Image":
    """Rows of PIL images -> one image (a row per solver/steps setting), with each row's label drawn in
    a left margin (PIL's default font) when labels are given."""
    from PIL import Image, ImageDraw, ImageFont
    w, h = rows[0][0].size
    font, margin = ImageFont.load_default(), 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = 8 + max(probe.multiline_textbbox((0, 0), lb, font=font, spacing=1)[2] for lb in labels)
    sheet = Image.new("RGB", (margin + w * max(len(r) for r in rows), h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, images in enumerate(rows):
        if labels:
            draw.multiline_text((4, r * h + 2), labels[r], fill="black", font=font, spacing=1)
        for c, img in enumerate(images):
            sheet.paste(img, (margin + c * w, r * h))
    return sheet

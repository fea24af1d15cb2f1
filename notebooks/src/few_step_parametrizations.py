"""Source of notebooks/few_step_parametrizations.ipynb: 5. LCM, TCD and PCM side by side."""
from nbcells import SETUP, code, md

#----------------------------------------------------------------------------
# 5. Three few-step parametrizations: LCM, TCD, PCM.

CELLS = [
    md(r"""
    # Three few-step parametrizations: LCM, TCD and PCM

    All three distil a teacher's PF-ODE into a function the student evaluates with **one** pass of
    the same $\epsilon$-prediction UNet, $\hat x_0 = (x_t - \sigma_t \hat\epsilon)/\alpha_t$. They differ
    in *where* along the trajectory the function lands:

    | | function | lands at | sampler |
    |---|---|---|---|
    | **LCM** (docs/method.md Sec. 2) | $f_\theta(z, t) = c_{skip}(t)\, z + c_{out}(t)\, \hat x_0$ | the end, $t = 0$ ($\sigma = 0$) | jump to 0, re-noise to $\tau_{i+1}$ |
    | **TCD** (arXiv 2402.19159) | $f_\theta(x_t, t, s) = \alpha_s \hat x_0 + \sigma_s \hat\epsilon$ (TCF(1)) | any $s \le t$ | strategic stochastic sampling, $\gamma \in [0, 1]$ |
    | **PCM** (arXiv 2405.18407) | $f^m_\theta(x_t, t) = \alpha_{s_m} \hat x_0 + \sigma_{s_m} \hat\epsilon$ | the lower edge $s_m$ of $t$'s phase | deterministic DDIM from edge to edge |

    Code: `lcm/consistency.py` (`f_theta`), `solvers/ddim.py` (`ddim_from_x0_eps`: the DDIM map
    $\alpha_s \hat x_0 + \sigma_s \hat\epsilon$ that TCD and PCM use), `solvers/tcd.py` (`tcd_s`, `sample_tcd`),
    `solvers/schedule.py` (`lcm_timesteps`, `pcm_edges`, `pcm_timesteps`), `lcm/pipeline.py`
    (solvers `lcm`, `tcd`, `pcm`). The TCD and PCM notes are in docs/method.md.
    """),
    code(SETUP),
    md(r"""
    ## LCM: one target, the trajectory's end

    $f_\theta(z, t) = c_{skip}(t) z + c_{out}(t) \hat x_0$ with $c_{skip}(0) = 1$, $c_{out}(0) = 0$ (the
    boundary condition $f(z, 0) = z$) and, with timestep scaling 10, $c_{skip} \approx 10^{-5}$ at every
    sampling timestep: in practice $f_\theta = \hat x_0$, a point at $\sigma = 0$.

    ## TCD: the trajectory consistency function, any target $s \le t$

    TCD's TCF(1) is a first-order exponential integrator in data-prediction form, with
    $h = \lambda_s - \lambda_t$ and $\lambda = \log(\alpha/\sigma)$:

    $$f_\theta(x_t, t, s) = \frac{\sigma_s}{\sigma_t} x_t - \alpha_s \left(e^{-h} - 1\right) \hat x_0(x_t, t)
      \;=\; \alpha_s \hat x_0 + \sigma_s \hat\epsilon ,$$

    the DDIM map from $t$ to $s$: no $c_{skip}$/$c_{out}$, and the boundary condition
    $f(x_s, s, s) = x_s$ holds for *any* network output, because $\hat x_0$ and $\hat\epsilon$ come from
    one output and $x_s = \alpha_s \hat x_0 + \sigma_s \hat\epsilon$ by definition. Below, both claims on
    random latents and a random "network output", in float64, for every pair $s < t$ of the 50-point
    grid $\{0, 19, 39, \ldots, 999\}$.
    """),
    code("""
    from lcm.consistency import ConsistencySpec, boundary_scalings, f_theta
    from solvers.ddim import ddim_from_x0_eps
    from solvers.schedule import Schedule, lcm_grid
    from solvers.wrappers import eps_to_x0

    S, spec = Schedule.make(), ConsistencySpec()       # SD's scaled_linear schedule; N = 50, sigma_data 0.5
    GRID = [0] + lcm_grid(spec.num_ddim_timesteps)     # 0, 19, 39, ..., 999
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps_hat = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)   # any network output


    def tcf(x_t, eps, t, s):
        \"\"\"TCF(1) f(x_t, t, s) = alpha_s x0_hat + sigma_s eps_hat (solvers.ddim.ddim_from_x0_eps).\"\"\"
        return ddim_from_x0_eps(eps_to_x0(eps, x_t, t, S), eps, s, S)


    def ei_form(x_t, eps, t, s):
        \"\"\"Exponential integrator (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) x0_hat, h = lambda_s - lambda_t.\"\"\"
        h = S.lambda_(s) - S.lambda_(t)
        return S.sigma(s) / S.sigma(t) * x_t - S.alpha(s) * torch.expm1(-h) * eps_to_x0(eps, x_t, t, S)


    pairs = [(t, s) for t in GRID[1:] for s in GRID if s < t]
    err_ei = max(((tcf(x, eps_hat, t, s) - ei_form(x, eps_hat, t, s)).abs().max() / x.abs().max()).item()
                 for t, s in pairs)
    err_bc = max((tcf(x, eps_hat, s, s) - x).abs().max().item() for s in GRID)
    print(f"max |TCF(1) - EI form| / max|x| over {len(pairs)} pairs (t, s): {err_ei:.1e}  (float64)")
    print(f"max |f(x_s, s, s) - x_s| over {len(GRID)} grid times s:        {err_bc:.1e}  (boundary, any eps_hat)")
    assert err_ei < 1e-12 and err_bc < 1e-12

    x0_hat = eps_to_x0(eps_hat, x, 999, S)
    lcm_end, tcd_end = f_theta(x, x0_hat, 999, spec), tcf(x, eps_hat, 999, 0)
    print(f"LCM f_theta(x, 999) vs x0_hat: {(lcm_end - x0_hat).abs().max().item():.1e}  "
          f"(c_skip(999) = {boundary_scalings(999)[0].item():.0e})")
    print(f"TCF(1)(x, 999, 0) = alpha_0 x0_hat + sigma_0 eps_hat, alpha_0 = {S.alpha(0).item():.5f}, "
          f"sigma_0 = {S.sigma(0).item():.4f}: TCD's 'end' is abar[0], not sigma = 0")
    """),
    md(r"""
    ## TCD's strategic stochastic sampling (SSS)

    From $\tau_i$ to $\tau_{i+1}$ (and $\tau_{i+1} = 0$ after the last grid point), with $\gamma \in [0, 1]$:

    $$s' = \lfloor (1 - \gamma)\, \tau_{i+1} \rfloor, \qquad x_{s'} = f_\theta(x_{\tau_i}, \tau_i, s'), \qquad
      x_{\tau_{i+1}} = \frac{\alpha_{\tau_{i+1}}}{\alpha_{s'}} x_{s'} + \sqrt{1 - \frac{\alpha^2_{\tau_{i+1}}}{\alpha^2_{s'}}}\; z,\quad z \sim \mathcal N(0, I).$$

    $\gamma$ sets how far *below* the next timestep the step denoises before it adds noise back:
    $\gamma = 0$ lands exactly on $\tau_{i+1}$ with no noise, i.e. deterministic **DDIM** on TCD's grid;
    $\gamma = 1$ denoises all the way to $s' = 0$ and re-noises with fresh noise, **LCM-like** (but not
    bit-equal to LCM: no $c_{skip}$/$c_{out}$, and the last step returns the point at $\bar\alpha_0$, not $\hat x_0$).
    TCD's grid is LCM's (`lcm_timesteps`); diffusers' TCDScheduler defaults to $\gamma = 0.3$, the paper
    used $\gamma = 0.2$. The intermediate times $s'$ on the 4-step grid:
    """),
    code("""
    from solvers.schedule import lcm_timesteps
    from solvers.tcd import tcd_s

    TS4 = lcm_timesteps(4)                             # TCD = LCM grid: [999, 759, 499, 259]
    GAMMAS = [0.0, 0.2, 0.3, 0.5, 1.0]
    print("tau_i        " + "  ".join(f"{t:>5d}" for t in TS4))
    print("tau_{i+1}    " + "  ".join(f"{p:>5d}" for p in TS4[1:] + [0]))
    for gamma in GAMMAS:
        print(f"s' (g = {gamma:.1f}) " + "  ".join(f"{tcd_s(p, gamma):>5d}" for p in TS4[1:] + [0]))
    """),
    md(r"""
    ## PCM: phases and the phased consistency function

    PCM splits the 50-point grid into $M$ phases with edges $s_0 = 0 < s_1 < \cdots < s_{M-1}$
    (split at grid indices $\lfloor \mathrm{linspace}(0, 50, M) \rfloor$, endpoint excluded; an edge is
    the grid point just below a split index). On phase $m$,
    $t \in (s_m, s_{m+1}]$, the phased consistency function maps to the phase's lower edge,

    $$f^m_\theta(x_t, t) = \alpha_{s_m} \hat x_0 + \sigma_{s_m} \hat\epsilon \quad (\text{PCM Eq. 3} = \text{DDIM from } t \text{ to } s_m),$$

    i.e. TCF(1) with $s$ fixed to $s_m$, so it inherits TCD's boundary condition at $t = s_m$. $M = 1$ is a
    consistency model in DDIM form (edge 0). The deterministic sampler with $n = M$ steps starts at
    $999$ and jumps with DDIM from edge to edge (`pcm_timesteps`): $[999, 739, 499, 239] \to 0$ for 4
    steps. TCD's / LCM's 4-step grid $[999, 759, 499, 259]$ and DDIM-trailing's $[999, 749, 499, 249]$ sit
    10-20 steps above the edges, so each of their steps crosses an edge mid-phase.
    Below, the lower edge of each grid point's phase, found with PCM's index rule
    (`pcm_phase_starts`), is checked against "the largest edge below $t$", then the grids are drawn.
    """),
    code("""
    from solvers.schedule import pcm_edges, pcm_phase_starts, pcm_timesteps, spaced_timesteps

    PHASES = [1, 2, 4, 8]
    for M in PHASES:
        edges, starts = pcm_edges(M), pcm_phase_starts(M)
        for i, t in enumerate(lcm_grid()):             # PCM code: phase of index i = largest start <= i
            idx = max(j for j in starts if j <= i)
            assert edges[starts.index(idx)] == max(e for e in edges if e < t)
        print(f"M = {M}: edges {edges}   phase-exact {M}-step grid {pcm_timesteps(M)}")

    ROWS = {f"PCM edges, M={M}": pcm_edges(M) for M in PHASES}
    ROWS |= {"PCM 4 steps (phase-exact)": pcm_timesteps(4), "TCD / LCM 4 steps": lcm_timesteps(4),
             "DDIM trailing 4 steps": spaced_timesteps(4, "trailing")}
    fig, ax = plt.subplots(figsize=(7, 2.4))
    for t in lcm_grid():
        ax.axvline(t, color="0.88", lw=0.8, zorder=0)
    for e in pcm_edges(4)[1:]:
        ax.axvline(e, color="C2", lw=0.8, ls="--", zorder=0)
    for i, (name, ts) in enumerate(ROWS.items()):
        ax.plot(ts, [i] * len(ts), "|" if name.startswith("PCM edges") else "o", ms=10 if i < 4 else 5,
                mew=2, color=f"C{i}")
    ax.set_yticks(range(len(ROWS)), list(ROWS)), ax.set_ylim(-0.6, len(ROWS) - 0.4), ax.set_xlim(-15, 1015)
    ax.set_xlabel("timestep t  (grey: the 50-point grid 19, 39, ..., 999; dashed: the M = 4 edges)")
    ax.set_title("PCM phase edges and the 4-step grids of PCM, TCD / LCM and DDIM")
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## On the demo model: one noisy latent through every sampler

    The demo teacher and the bundled **LCM-LoRA**. There is no trained TCD or PCM LoRA in the demo
    assets, so the TCD and PCM samplers below run on the LCM-distilled weights (and PCM also on the
    teacher with CFG): this compares the *samplers* on one set of weights, not the three distillation
    methods. Weights trained for TCD or PCM come from `python train.py experiment=demo_tcd_lora` /
    `experiment=demo_pcm_lora`; the Pipeline then samples them with `solver="tcd"` / `solver="pcm"`.
    The Pipeline logs a warning when a sampler does not match the adapter's objective, as it does here.

    Every run starts from the **same** $z_{999}$ (one prompt, one seed, `latents=`), through the
    product path `Pipeline.__call__`; a forward hook on the UNet records the timestep of every call.
    LCM-LoRA runs use $s = 1$ (the guidance is distilled in), the teacher uses CFG with $s = 7.5$.
    """),
    code("""
    import logging

    from demo import world
    from demo.evaluator import DemoEvaluator
    from lcm.pipeline import Pipeline

    logging.getLogger("lcm.pipeline").setLevel(logging.ERROR)   # the sampler/objective mismatch is intended here
    pipe = Pipeline.from_checkpoint(os.path.join(DEMO, "demo_teacher.safetensors"))
    pipe.load_lora(os.path.join(DEMO, "demo_lcm_lora.safetensors"), name="lcm")
    evaluator = DemoEvaluator.load(os.path.join(DEMO, "demo_evaluator.safetensors"))
    S, TEACHER_S, SEED = pipe.schedule, 7.5, 0
    attrs, _ = world.sample(seed=0, index=3, resolution=pipe.default_size)
    PROMPT = world.caption(attrs)
    h = pipe.default_size // pipe.latent_factor
    z_T = torch.randn((1, pipe.unet.in_channels, h, h), generator=torch.Generator().manual_seed(SEED))

    unet_calls = []                                    # timestep of every UNet forward
    pipe.unet.register_forward_hook(lambda m, args, out: unet_calls.append(int(args[1].reshape(-1)[0])))


    def run(lora: float, **kw):
        \"\"\"Sample PROMPT from z_T with the LCM-LoRA at scale `lora`; (latent, UNet call times).\"\"\"
        unet_calls.clear()
        pipe.set_lora_scales({"lcm": lora})
        z = pipe(PROMPT, latents=z_T, seed=SEED, output="latent", progress=False, **kw)
        return z, list(unet_calls)


    RUNS = {   # name: (LoRA scale, pipeline kwargs)
        "LCM 1 step": (1.0, dict(solver="lcm", steps=1)),
        "LCM 2 steps": (1.0, dict(solver="lcm", steps=2)),
        "LCM 4 steps": (1.0, dict(solver="lcm", steps=4)),
        "TCD g=0, 4 steps": (1.0, dict(solver="tcd", steps=4, eta=0.0)),
        "TCD g=0.3, 4 steps": (1.0, dict(solver="tcd", steps=4, eta=0.3)),
        "TCD g=1, 4 steps": (1.0, dict(solver="tcd", steps=4, eta=1.0)),
        "PCM 2 steps": (1.0, dict(solver="pcm", steps=2)),
        "PCM 4 steps": (1.0, dict(solver="pcm", steps=4)),
        "teacher PCM grid, 4 steps": (0.0, dict(solver="pcm", steps=4, guidance_scale=TEACHER_S)),
        "teacher DDIM 25 steps": (0.0, dict(solver="ddim", steps=25, spacing="trailing", guidance_scale=TEACHER_S)),
    }
    out = {name: run(lora, **kw) for name, (lora, kw) in RUNS.items()}
    pipe.set_lora_scales({"lcm": 1.0})
    print(PROMPT, "| z_T", tuple(z_T.shape))
    """),
    code("""
    names = list(out)
    images = pipe.decode(torch.cat([out[n][0] for n in names]))
    ref = out["teacher DDIM 25 steps"][0]
    fig, axes = plt.subplots(2, 5, figsize=(7.5, 4.2))
    for ax, name, img in zip(axes.flat, names, images):
        ax.imshow(img.permute(1, 2, 0).numpy()), ax.set_xticks([]), ax.set_yticks([])
        weights = "teacher, s=7.5" if name.startswith("teacher") else "LCM-LoRA, s=1"
        ax.set_title(f"{name.replace('teacher ', '')}\\n({weights})", fontsize=7)
    fig.suptitle(f"one z_999, one seed: '{PROMPT}'")
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    The table lists, per run, the UNet calls (an image under CFG costs one batched call of 2 images),
    the timesteps $\tau_i$ the UNet saw, and where each step lands before the next call: LCM at
    $\sigma = 0$ ($\hat x_0$), TCD at $s'$ (then re-noised to $\tau_{i+1}$ if $\gamma > 0$), DDIM/PCM at the next
    timestep / edge. "rel. dist." is $\lVert z - z_{ref} \rVert / \lVert z_{ref} \rVert$ to the teacher's DDIM-25
    latent from the same $z_{999}$, and "attributes" counts the content attributes of the prompt that the
    demo evaluator recognises in the image (of 5; one image, so a coarse signal).
    """),
    code("""
    from demo.world import CONTENT


    def landing(name, ts):
        \"\"\"Where each step lands (recomputed from the solver rules; 'x0' = sigma 0).\"\"\"
        nxt = ts[1:] + [0]
        if name.startswith("LCM"):
            return ["x0"] * len(ts)
        if name.startswith("TCD"):
            gamma = RUNS[name][1]["eta"]
            return [str(tcd_s(p, gamma)) for p in nxt]
        return [str(p) for p in nxt]                   # DDIM / PCM: the next timestep (edge), 0 last


    def fmt(xs):
        \"\"\"A timestep list, shortened past 8 entries.\"\"\"
        return ", ".join(map(str, xs)) if len(xs) <= 8 else f"{', '.join(map(str, xs[:3]))}, ..., {xs[-1]} ({len(xs)})"


    acc = {n: evaluator.prompt_accuracy(img[None] * 2 - 1, [PROMPT]) for n, img in zip(names, images)}
    print(f"{'run':26s} {'calls':>5s} {'rel. dist.':>10s} {'attributes':>10s}  UNet timesteps -> lands at")
    for name in names:
        z, calls = out[name]
        ts = sorted(set(calls), reverse=True)
        dist = ((z - ref).norm() / ref.norm()).item()
        right = sum(int(acc[name][k]) for k in CONTENT)
        print(f"{name:26s} {len(calls):5d} {dist:10.3f} {right:>8d}/5  [{fmt(ts)}] -> [{fmt(landing(name, ts))}]")
    """),
    md(r"""
    ## The sampler identities on the real model

    * TCD with $\gamma = 0$ is DDIM on TCD's grid: compare with `solver="ddim"` given the same timesteps.
    * TCD with $\gamma = 1$ is LCM-like: same grid, same noise draws (one per non-final step from the same
      seed), but DDIM form instead of $c_{skip}$/$c_{out}$ and an end at $\bar\alpha_0$. The difference is small
      and comes mostly from the last step ($\sigma_0 \hat\epsilon$ at $s' = 0$).
    * PCM's sampler is DDIM on the phase-exact grid: compare with `solver="ddim"` on `pcm_timesteps(4)`.
    * TCF(1) on the real UNet output equals its exponential-integrator form (float32 here).
    """),
    code("""
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    maxdiff = lambda a, b: (a - b).abs().max().item()
    ddim_tcd, _ = run(1.0, solver="ddim", timesteps=lcm_timesteps(4))
    ddim_pcm, _ = run(1.0, solver="ddim", timesteps=pcm_timesteps(4))
    print(f"TCD g=0 vs DDIM on {lcm_timesteps(4)}: max |diff| = {maxdiff(out['TCD g=0, 4 steps'][0], ddim_tcd):.1e}")
    print(f"PCM 4   vs DDIM on {pcm_timesteps(4)}: max |diff| = {maxdiff(out['PCM 4 steps'][0], ddim_pcm):.1e}")
    print(f"TCD g=1 vs LCM, 4 steps: relative distance {rel(out['TCD g=1, 4 steps'][0], out['LCM 4 steps'][0]):.4f}  "
          f"(vs TCD g=0.3: {rel(out['TCD g=0.3, 4 steps'][0], out['LCM 4 steps'][0]):.3f})")

    model = pipe.denoiser([PROMPT])                    # the LCM-LoRA UNet as the solvers call it, s = 1
    x0_u, eps_u = model.x0_eps(z_T, torch.tensor(999))
    err = max(maxdiff(ddim_from_x0_eps(x0_u, eps_u, s, S), ei_form(z_T, eps_u, 999, s))
              for s in lcm_grid()[:-1] + [0])
    print(f"real UNet at t = 999: max |TCF(1) - EI form| over 50 targets s = {err:.1e} (float32)")
    assert err < 1e-4 and maxdiff(out["PCM 4 steps"][0], ddim_pcm) < 1e-4 and maxdiff(out["TCD g=0, 4 steps"][0], ddim_tcd) < 1e-4
    """),
    md(r"""
    ## What this shows, and what it does not

    * The three functions share one network output and differ only in the target time: $\sigma = 0$ (LCM),
      any $s$ (TCD), the phase edge (PCM). TCD's and PCM's are the DDIM map, equal to the first-order
      exponential integrator, with the boundary condition built in; LCM's needs $c_{skip}$/$c_{out}$.
    * On LCM-distilled weights, TCD with $\gamma$ close to 1 behaves like LCM sampling, while $\gamma = 0$
      (DDIM) and the PCM grid use the LCM-LoRA as a one-step ODE solver between grid points, which it
      was not trained to be (it was trained to jump to $t = 0$). On this tiny demo model they still land
      about as close to the teacher's DDIM-25 latent as LCM sampling does (table above): the LCM-LoRA's
      $\hat x_0$ is close to the trajectory's end, so the DDIM map built from it stays near the trajectory.
      The undistilled teacher on the same 4-step PCM grid does not.
    * Judging TCD or PCM themselves needs weights trained with their objectives
      (`experiment=demo_tcd_lora`, `experiment=demo_pcm_lora`) and many prompts and seeds (e.g. the
      demo evaluator's prompt accuracy over a prompt set), not one image and one seed.
    """),
]

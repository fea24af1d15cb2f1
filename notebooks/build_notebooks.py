"""Write the notebooks in this folder from the Python source below (no outputs, commit-ready).

    python notebooks/build_notebooks.py            # rewrite every notebook
    python notebooks/build_notebooks.py --check    # exit 1 if a notebook differs from this source

The notebooks only import the project's modules (solvers/, lcm/, models/); the math lives there.
They read the demo assets (teacher, LCM-LoRA, style LoRA, evaluator) from $LCM_DEMO_DIR, default
../assets. tests/test_notebooks.py executes every notebook and checks they match this file.
"""
import argparse
import os
import sys
import textwrap

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())

#----------------------------------------------------------------------------
# Shared first cell: import path, demo folder, plotting (pure plotting helpers only).

SETUP = '''
import os
import sys

ROOT = os.path.abspath("..")                    # the notebooks run from notebooks/
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
DEMO = os.environ.get("LCM_DEMO_DIR", os.path.join(ROOT, "assets"))   # demo teacher, LoRAs, evaluator

import warnings

import matplotlib.pyplot as plt
import torch

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets
torch.set_grad_enabled(False)                   # inference only unless a cell says otherwise
plt.rcParams.update({"figure.dpi": 72, "font.size": 8, "axes.titlesize": 8})


def show_grid(images, rows, cols, title=None, size=1.1):
    """Plot images (len(rows) * len(cols), 3, H, W) in [0, 1] as a labelled grid."""
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(size * len(cols), size * len(rows) + 0.3),
                             squeeze=False)
    for ax, img in zip(axes.flat, images):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    for ax, c in zip(axes[0], cols):
        ax.set_title(c)
    for ax, r in zip(axes[:, 0], rows):
        ax.set_ylabel(r, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    plt.show()
'''

#----------------------------------------------------------------------------
# 1. The consistency function.

CONSISTENCY = [
    md(r"""
    # The consistency function of LCM

    A consistency model learns a function $f$ that maps every point of a probability-flow ODE
    (PF-ODE) trajectory to the trajectory's clean end point $x_\epsilon$:

    $$f(x_t, t) = f(x_{t'}, t') \quad \text{for all } t, t' \text{ on one trajectory}, \qquad f(x_\epsilon, \epsilon) = x_\epsilon .$$

    LCM (PAPER.md Sec. 2) parameterises it on SD latents with the denoiser's clean-latent
    estimate $\hat x_0$:

    $$f_\theta(z, t) = c_{skip}(t)\, z + c_{out}(t)\, \hat x_0(z, t),
    \qquad \hat x_0 = \frac{z - \sigma_t \hat\epsilon}{\alpha_t}\ \ (\epsilon\text{-prediction}).$$

    Code: `lcm/consistency.py` (`boundary_scalings`, `f_theta`), `solvers/wrappers.py` (`to_x0`,
    the only place that knows the prediction type).
    """),
    code(SETUP),
    code("""
    from lcm.consistency import ConsistencySpec, boundary_scalings, f_theta
    from solvers.schedule import Schedule, lcm_grid

    S = Schedule.make()                             # SD's scaled_linear schedule, T = 1000
    spec = ConsistencySpec()                        # sigma_data = 0.5, timestep_scaling = 10
    spec
    """),
    md(r"""
    ## Boundary scalings, with and without timestep scaling

    With $s = \text{timestep\_scaling} \cdot t$ on the raw integer timestep and $\sigma_{data} = 0.5$:

    $$c_{skip}(t) = \frac{\sigma_{data}^2}{s^2 + \sigma_{data}^2}, \qquad
      c_{out}(t) = \frac{s}{\sqrt{s^2 + \sigma_{data}^2}} .$$

    The reference code uses timestep_scaling = 10 ("t / 0.1"). Without it ($s = t$) the skip
    connection still weighs 0.2 at $t = 1$; with it, $f_\theta$ equals $\hat x_0$ to about
    $10^{-5}$ at every sampling timestep ($t \ge 19$) and the boundary only acts at $t = 0$.
    """),
    code("""
    t = torch.tensor([0, 1, 19, 139, 259, 999])
    print(f"{'t':>5} | {'c_skip (x10)':>12} {'c_out (x10)':>12} | {'c_skip (x1)':>12} {'c_out (x1)':>12}")
    for ti in t.tolist():
        a = boundary_scalings(ti, spec.sigma_data, 10.0)
        b = boundary_scalings(ti, spec.sigma_data, 1.0)
        print(f"{ti:5d} | {a[0].item():12.3g} {a[1].item():12.8f} | {b[0].item():12.3g} {b[1].item():12.8f}")
    """),
    code("""
    ts = torch.arange(0, 1000)
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
    for scaling, style in [(10.0, "-"), (1.0, "--")]:
        c_skip, c_out = boundary_scalings(ts, spec.sigma_data, scaling)
        axes[0].plot(ts[:40], c_skip[:40], style, label=f"c_skip, scaling {scaling:g}")
        axes[0].plot(ts[:40], c_out[:40], style, label=f"c_out, scaling {scaling:g}")
        axes[1].loglog(ts[1:], c_skip[1:], style, label=f"c_skip, scaling {scaling:g}")
    grid = lcm_grid(spec.num_ddim_timesteps)
    axes[0].axvline(grid[0], color="gray", lw=0.8, label=f"first LCM grid point t={grid[0]}")
    axes[0].set_xlabel("t"), axes[0].legend(fontsize=6)
    axes[1].set_xlabel("t"), axes[1].set_ylabel("c_skip"), axes[1].legend(fontsize=6)
    axes[1].set_title("c_skip on a log scale: 1 - c_out is of the same order")
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## The boundary condition $f(z, 0) = z$

    $c_{skip}(0) = 1$ and $c_{out}(0) = 0$ exactly, so $f_\theta(z, 0) = z$ whatever the network
    returns. In training, $t = 0$ is the target time for the start $t_{n+k} = 19$; it anchors the
    chain of targets. At $t = 19$ the network output already dominates.
    """),
    code("""
    z, junk = torch.randn(2, 4, 8, 8), 100 * torch.randn(2, 4, 8, 8)     # junk: any network output
    assert torch.equal(f_theta(z, junk, 0, spec), z)                     # exact, not approximate
    x0 = torch.randn_like(z)
    print("max |f_theta(z, 19) - x0_hat| / max|z|:", ((f_theta(z, x0, 19, spec) - x0).abs().max() / z.abs().max()).item())
    """),
    md(r"""
    ## $f_\theta$ on the demo model

    The demo teacher is a tiny SD-architecture model trained on the procedural demo world; the
    LCM-LoRA distils it (PAPER.md Sec. 3). Below, a real demo image is encoded,
    $z = \text{vae\_scale}\cdot E(x)$, noised with one $\epsilon$ to $z_t = \alpha_t z + \sigma_t \epsilon$,
    and mapped back by

    * the teacher's guided one-step estimate $\hat x_0(z_t, t)$ (LoRA disabled, CFG with scale $s$),
    * the LCM: $f_\theta(z_t, t)$ with the LCM-LoRA (no CFG: the guidance is distilled in).

    Every picture is a latent decoded by the VAE.
    """),
    code("""
    from lcm import demo_world
    from lcm.pipeline import Pipeline
    from models.lora import adapters_disabled
    from solvers.wrappers import make_x0_fn

    pipe = Pipeline.from_checkpoint(os.path.join(DEMO, "demo_teacher.safetensors"))
    pipe.load_lora(os.path.join(DEMO, "demo_lcm_lora.safetensors"), name="lcm")
    S, spec = pipe.schedule, pipe.spec
    TEACHER_S = 7.5                                  # teacher CFG scale s (= w + 1 in LCM's convention)

    attrs, x = demo_world.sample(seed=0, index=3, resolution=pipe.default_size)
    prompt = demo_world.caption(attrs)
    context = pipe.encode_prompt([prompt, ""]).context     # [c; uncond], (2, 77, D)


    def net_fn(x, t, with_uncond):
        \"\"\"The solvers' network contract (solvers/wrappers.py): raw UNet output for [c] or [c; uncond].\"\"\"
        ctx = context if with_uncond else context[:1]
        return pipe.unet(x, t.reshape(1).expand(len(x)), ctx.repeat_interleave(len(x) // len(ctx), 0))


    teacher_x0 = make_x0_fn(net_fn, pipe.prediction_type, S, TEACHER_S)     # guided x0_hat
    lcm_f = spec.consistency_fn(make_x0_fn(net_fn, pipe.prediction_type, S))  # f_theta(z, t), no CFG

    z = pipe.vae.encode(x[None]).sample(generator=torch.Generator().manual_seed(0)) * pipe.vae_scale
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    print(prompt, "| latent", tuple(z.shape))
    """),
    code("""
    T_SHOW = [0, 19, 259, 499, 759, 999]
    rows = {"z_t": [], f"teacher x0_hat, s={TEACHER_S:g}": [], "LCM f_theta": []}
    for t in T_SHOW:
        t = torch.tensor(t)
        z_t = S.add_noise(z, eps, t)                   # z_t = alpha_t z + sigma_t eps
        with adapters_disabled(pipe.unet):
            x0_teacher = teacher_x0(z_t, t)
        f = lcm_f(z_t, t)
        if t == 0:
            assert torch.equal(f, z_t)                 # the boundary condition, on the real model
        for key, lat in zip(rows, (z_t, x0_teacher, f)):
            rows[key].append(pipe.decode(lat)[0])
    show_grid([img for r in rows.values() for img in r], list(rows), [f"t={t}" for t in T_SHOW],
              title=f"forward-noised demo image: '{prompt}'")
    """),
    md(r"""
    ## Self-consistency along one teacher trajectory

    Run the teacher's guided DDIM (a PF-ODE solver, 25 steps) from noise and keep every
    intermediate latent $z_t$. A perfect consistency function returns the same end point from each
    of them; the teacher's one-step estimate $\hat x_0(z_t, t)$ only gets there at small $t$.
    The plot shows $\lVert f(z_t, t) - z_{end} \rVert$ / $\lVert z_{end} \rVert$ along the trajectory.
    """),
    code("""
    from solvers.ddim import sample_ddim
    from solvers.schedule import spaced_timesteps
    from solvers.wrappers import make_eps_fn

    ts = spaced_timesteps(25, "trailing")              # 999, 959, ..., 39: all on the LCM grid
    h = pipe.latent_factor
    z_T = torch.randn((1, pipe.unet.in_channels, pipe.default_size // h, pipe.default_size // h),
                      generator=torch.Generator().manual_seed(2))
    traj = [(ts[0], z_T)]
    record = lambda i, t, x_new, x0: traj.append((ts[i + 1] if i + 1 < len(ts) else 0, x_new))
    with adapters_disabled(pipe.unet):
        z_end = sample_ddim(make_eps_fn(net_fn, pipe.prediction_type, S, TEACHER_S), z_T, ts, S, callback=record)

    err = {"teacher x0_hat": [], "LCM f_theta": []}
    for t, z_t in traj[:-1]:
        t = torch.tensor(t)
        with adapters_disabled(pipe.unet):
            err["teacher x0_hat"].append(((teacher_x0(z_t, t) - z_end).norm() / z_end.norm()).item())
        err["LCM f_theta"].append(((lcm_f(z_t, t) - z_end).norm() / z_end.norm()).item())

    fig, ax = plt.subplots(figsize=(4.5, 2.4))
    for k, v in err.items():
        ax.plot([t for t, _ in traj[:-1]], v, "o-", ms=3, label=k)
    ax.invert_xaxis(), ax.set_xlabel("t along the trajectory"), ax.set_ylabel("relative distance to the end")
    ax.legend(), fig.tight_layout()
    plt.show()

    show_t = [999, 759, 519, 279, 39]
    pick = [z_t for t, z_t in traj if t in show_t]
    end = pipe.decode(z_end)[0]
    imgs = [pipe.decode(lcm_f(z_t, torch.tensor(t)))[0] for t, z_t in zip(show_t, pick)] + [end]
    with adapters_disabled(pipe.unet):
        imgs += [pipe.decode(teacher_x0(z_t, torch.tensor(t)))[0] for t, z_t in zip(show_t, pick)] + [end]
    show_grid(imgs, ["LCM f_theta", "teacher x0_hat"], [f"from t={t}" for t in show_t] + ["DDIM end point"],
              title="predicted end point from points of one teacher trajectory")
    """),
]

#----------------------------------------------------------------------------
# 2. PF-ODE solvers.

SOLVERS = [
    md(r"""
    # PF-ODE solvers: DDIM, DPM-Solver(++), and LCM sampling

    For the forward process $z_t = \alpha_t z_0 + \sigma_t \epsilon$, the probability-flow ODE
    in $\lambda_t = \log(\alpha_t / \sigma_t)$ has the exact solution (DPM-Solver, Prop. 3.1)

    $$x_t = \frac{\alpha_t}{\alpha_s} x_s - \alpha_t \int_{\lambda_s}^{\lambda_t} e^{-\lambda}\, \hat\epsilon(x_\lambda, \lambda)\, d\lambda .$$

    * **DDIM** holds $\hat\epsilon$ (equivalently $\hat x_0$) constant over a step:
      $x_t = \frac{\alpha_t}{\alpha_s} x_s - \sigma_t (e^{h} - 1)\hat\epsilon(x_s, s)$, $h = \lambda_t - \lambda_s$.
      It is DPM-Solver-1.
    * **DPM-Solver-2/3** (singlestep) evaluate $\hat\epsilon$ at intermediate times $s_i$ with
      $\lambda_{s_i} = \lambda_s + r_i h$: 2 and 3 model calls per step, error $O(h^2)$, $O(h^3)$.
    * **DPM-Solver++(2M)** works with $\hat x_0$ and reuses the previous step's estimate:
      $D = (1 + \frac{1}{2r}) \hat x_0^{(i-1)} - \frac{1}{2r} \hat x_0^{(i-2)}$, one call per step.
    * **LCM** does not integrate: it jumps with the consistency function to $t=0$, then re-noises to the
      next timestep with fresh noise (PAPER.md Sec. 7).

    Code: `solvers/ddim.py`, `solvers/dpm_solver.py`, `solvers/lcm.py`, `solvers/schedule.py`.
    """),
    code(SETUP),
    md(r"""
    ## Gaussian data: the PF-ODE in closed form

    For data $x_0 \sim \mathcal N(\mu, \mathrm{diag}(s_0^2))$ every marginal is Gaussian,
    $p_t = \mathcal N(\alpha_t \mu, \alpha_t^2 s_0^2 + \sigma_t^2)$, the ideal noise prediction is
    $\hat\epsilon(x, t) = -\sigma_t \nabla \log p_t(x) = \sigma_t (x - \alpha_t\mu) / (\alpha_t^2 s_0^2 + \sigma_t^2)$, and the
    PF-ODE keeps the standardised coordinate fixed:

    $$x_u = \alpha_u \mu + \frac{\mathrm{std}_u}{\mathrm{std}_t} (x_t - \alpha_t \mu), \qquad \mathrm{std}_t = \sqrt{\alpha_t^2 s_0^2 + \sigma_t^2}.$$

    So we know every solver's exact answer, and the exact consistency function
    $f(x_t, t) = x_0^{\text{ODE}}$ (the flow to $t = 0$). These three formulas live in
    `solvers/gaussian.py` (three one-line methods), the test oracle of `tests/test_solvers.py`.
    """),
    code("""
    from solvers.gaussian import GaussianData
    from solvers.schedule import Schedule

    S = Schedule.make()
    D = 16                                             # independent data dimensions
    gauss = GaussianData.random(D, S)
    MU, marginal_std = gauss.mu, gauss.std             # std_t = sqrt(alpha_t^2 s0^2 + sigma_t^2)
    gauss_eps = gauss.eps                              # eps_hat = sigma_t (x - alpha_t mu) / std_t^2
    gauss_flow = gauss.flow                            # exact PF-ODE map x_t -> x_u
    """),
    md(r"""
    ## Error vs NFE along one trajectory

    Every solver starts from the same $x_T \sim \mathcal N(0, I)$ at $t = 999$ and integrates to
    $t = 0$ on a grid uniform in $\lambda$ (DPM-Solver's recommended spacing). The error is the RMS
    distance to the exact flow of the same $x_T$. NFE = number of model calls, counted. At equal NFE,
    DPM-Solver-2 takes half the steps of DDIM and DPM-Solver-3 a third. Expected slopes: 1 (DDIM,
    DPM-Solver-1), 2 (DPM-Solver-2, ++(2M)), 3 (DPM-Solver-3). LCM with the exact consistency
    function is exact after one call; more LCM steps leave the trajectory (fresh noise), so
    they are compared on the distribution below.
    """),
    code("""
    from solvers.ddim import sample_ddim
    from solvers.dpm_solver import sample_dpm_solver, sample_dpmpp_2m
    from solvers.lcm import sample_lcm
    from solvers.schedule import lcm_timesteps


    def counted(model_fn, calls):
        \"\"\"model_fn that records the time of every call (NFE bookkeeping, not math).\"\"\"
        def fn(x, t):
            calls.append(float(t))
            return model_fn(x, t)
        return fn


    def lambda_grid(n, t0=999, t1=0):
        \"\"\"n steps uniform in lambda from t0 to t1 (continuous float64 times via inverse_lambda).\"\"\"
        lam = torch.linspace(float(S.lambda_(t0)), float(S.lambda_(t1)), n + 1, dtype=torch.float64)
        ts = list(S.inverse_lambda(lam))
        return ts[:-1], ts[-1]


    SOLVERS = {   # name: (model calls per step, run(model_fn, x, timesteps, t_end))
        "DDIM": (1, lambda f, x, ts, te: sample_ddim(f, x, ts, S, t_final=te)),
        "DPM-Solver-1": (1, lambda f, x, ts, te: sample_dpm_solver(f, x, ts, S, order=1, t_final=te)),
        "DPM-Solver-2": (2, lambda f, x, ts, te: sample_dpm_solver(f, x, ts, S, order=2, t_final=te)),
        "DPM-Solver-3": (3, lambda f, x, ts, te: sample_dpm_solver(f, x, ts, S, order=3, t_final=te)),
        "DPM-Solver++(2M)": (1, lambda f, x, ts, te: sample_dpmpp_2m(f, x, ts, S, t_final=te,
                                                                       lower_order_final=False)),
    }
    NFES = [6, 12, 24, 48, 96]
    x_T = torch.randn(256, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rms = lambda a, b: (a - b).pow(2).mean().sqrt().item()

    traj_err = {}
    for name, (per_step, run) in SOLVERS.items():
        traj_err[name] = []
        for nfe in NFES:
            ts, t_end = lambda_grid(nfe // per_step)
            calls = []
            out = run(counted(gauss_eps, calls), x_T, ts, t_end)
            assert len(calls) == nfe, (name, nfe, len(calls))
            traj_err[name].append(rms(out, gauss_flow(x_T, ts[0], t_end)))

    exact_f = lambda z, t: gauss_flow(z, t, 0)         # the exact consistency function f(z, t) = x_0
    lcm_1 = sample_lcm(exact_f, x_T, lcm_timesteps(1), S)
    lcm_err = rms(lcm_1, gauss_flow(x_T, 999, 0))

    fig, ax = plt.subplots(figsize=(4.8, 3))
    for name, errs in traj_err.items():
        ax.loglog(NFES, errs, "o-" if name != "DPM-Solver-1" else "x--", ms=4, label=name)
    floor = min(min(v) for v in traj_err.values()) / 10
    ax.loglog([1], [max(lcm_err, floor)], "k*", ms=9,
              label=f"LCM, exact f, 1 step: error {lcm_err:.1g} (drawn at >= floor)")
    ax.set_xlabel("NFE"), ax.set_ylabel("RMS error vs the exact ODE solution"), ax.legend(fontsize=6)
    fig.tight_layout()
    plt.show()
    for name, errs in traj_err.items():
        slopes = [torch.log2(torch.tensor(a / b)).item() for a, b in zip(errs, errs[1:])]
        print(f"{name:18s} observed order {slopes[-2]:.2f} (log2 of the error ratio per NFE doubling)")
    """),
    md(r"""
    ## Error of the sampled distribution

    Samplers are judged by their output distribution. Here the target is $p_0$, and the distance is
    the Fréchet distance between Gaussians fitted to the samples and $p_0$ (the FID formula,
    `lcm.demo_eval.frechet_distance`). Two floors appear:

    * the **Monte-Carlo floor** (exact samples of $p_0$, same count);
    * the **prior mismatch**: every sampler starts from $\mathcal N(0, I)$, but
      $p_{999} = \mathcal N(\alpha_{999}\mu, \ldots)$ with $\alpha_{999} = 0.068$. Even the exact ODE
      carries this error to $t = 0$. LCM's re-noising draws fresh $z_{\tau_{i+1}}$ from (almost) the
      right marginal, so multistep LCM sheds most of it.
    """),
    code("""
    from lcm.demo_eval import FeatureStats, feature_stats, frechet_distance

    N = 16384
    x_T = torch.randn(N, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p0 = FeatureStats(S.alpha(0) * MU, torch.diag(marginal_std(0) ** 2), N)
    fd = lambda samples: frechet_distance(feature_stats(samples), p0)

    exact = torch.randn(N, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mc_floor = fd(S.alpha(0) * MU + marginal_std(0) * exact)          # exact samples of p_0
    prior_floor = fd(gauss_flow(x_T, 999, 0))
    dist_err = {name: [fd(run(gauss_eps, x_T, *lambda_grid(nfe // per_step))) for nfe in NFES]
                for name, (per_step, run) in SOLVERS.items() if name != "DPM-Solver-1"}
    LCM_STEPS = [1, 2, 4, 8]
    lcm_fd = [fd(sample_lcm(exact_f, x_T, lcm_timesteps(n), S, generator=torch.Generator().manual_seed(5)))
              for n in LCM_STEPS]

    fig, ax = plt.subplots(figsize=(4.8, 3))
    for name, errs in dist_err.items():
        ax.loglog(NFES, errs, "o-", ms=4, label=name)
    ax.loglog(LCM_STEPS, lcm_fd, "k*-", ms=7, label="LCM (exact f)")
    ax.axhline(prior_floor, color="gray", ls="--", lw=1, label="exact ODE from N(0, I)")
    ax.axhline(mc_floor, color="gray", ls=":", lw=1, label="Monte-Carlo floor")
    ax.set_xlabel("NFE"), ax.set_ylabel("Frechet distance to p_0"), ax.legend(fontsize=6)
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## Where each method spends its NFEs

    The same budget of 12 model calls, placed on the half-log-SNR axis $\lambda_t$ (noise on the left,
    data on the right). DDIM and DPM-Solver++(2M) evaluate at grid points only;
    DPM-Solver-2/3 spend 1 or 2 of every 2 or 3 calls at intermediate times $s_i$ they find with
    `inverse_lambda`; LCM spends each call on a full jump to $t = 0$ and re-noises.
    """),
    code("""
    where = {}                                         # name: (call times, calls per step)
    for name in ["DDIM", "DPM-Solver-2", "DPM-Solver-3", "DPM-Solver++(2M)"]:
        per_step, run = SOLVERS[name]
        calls = []
        run(counted(gauss_eps, calls), x_T[:2], *lambda_grid(12 // per_step))
        where[name] = calls, per_step
    calls = []
    sample_lcm(counted(exact_f, calls), x_T[:2], lcm_timesteps(4), S)
    where["LCM, 4 steps"] = calls, 1

    fig, ax = plt.subplots(figsize=(6, 2.2))
    for i, (name, (calls, per_step)) in enumerate(where.items()):
        lam = S.lambda_(torch.tensor(calls, dtype=torch.float64))
        ax.plot(lam[::per_step], [i] * len(lam[::per_step]), "|", ms=12, mew=2, color=f"C{i}")
        inter = [l for j, l in enumerate(lam.tolist()) if j % per_step]
        ax.plot(inter, [i] * len(inter), "x", ms=5, color=f"C{i}")
    ax.set_yticks(range(len(where)), [f"{n} ({len(c)} calls)" for n, (c, _) in where.items()])
    ax.set_ylim(-0.7, len(where) - 0.3)
    ax.set_xlabel("lambda_t = log(alpha_t / sigma_t) of each model call  (|: step start, x: intermediate time)")
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## The same solvers on the demo model

    The teacher samples with DDIM and DPM-Solver++(2M) under CFG with scale $s$ (two UNet passes
    per call: conditional and unconditional, batched). The teacher + LCM-LoRA samples with LCM at
    $s = 1$ (one pass). The demo evaluator scores each setting on a fixed set of prompts
    ("accuracy": every content attribute of the prompt recognised; see `lcm/demo_eval.py`).
    """),
    code("""
    from lcm import demo_world
    from lcm.demo_eval import DemoEvaluator
    from lcm.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(os.path.join(DEMO, "demo_teacher.safetensors"))
    evaluator = DemoEvaluator.load(os.path.join(DEMO, "demo_evaluator.safetensors"))
    TEACHER_S = 7.5                                    # usual CFG scale s (LCM's w = s - 1)
    STEPS = [1, 2, 4, 8]
    PROMPTS = demo_world.fixed_prompt_set(8)

    unet_calls = []                                    # (batch, t) of every UNet forward
    log_call = lambda m, args, out: unet_calls.append((args[0].shape[0], args[1].reshape(-1)[0].item()))
    pipe.unet.register_forward_hook(log_call)


    def generate(**kw):
        \"\"\"Sample PROMPTS; returns images (B, 3, H, W) in [0, 1], accuracy, and the UNet calls made.\"\"\"
        unet_calls.clear()
        imgs = pipe(PROMPTS, seed=0, output="tensor", progress=False, **kw)
        acc = evaluator.prompt_accuracy(imgs * 2 - 1, PROMPTS)["overall"]
        return imgs, acc, list(unet_calls)


    results = {}
    for n in STEPS:
        results["teacher DDIM", n] = generate(solver="ddim", steps=n, guidance_scale=TEACHER_S)
        results["teacher DPM++(2M)", n] = generate(solver="dpmsolver++", steps=n, guidance_scale=TEACHER_S)
    reference = generate(solver="ddim", steps=25, guidance_scale=TEACHER_S)
    results["teacher DPM-Solver-2", 4] = generate(solver="dpmsolver", steps=4, guidance_scale=TEACHER_S)

    pipe.load_lora(os.path.join(DEMO, "demo_lcm_lora.safetensors"), name="lcm")
    for n in STEPS:
        results["LCM-LoRA, LCM", n] = generate(solver="lcm", steps=n, guidance_scale=1.0)
    results["LCM-LoRA, LCM s=1.5", 4] = generate(solver="lcm", steps=4, guidance_scale=1.5)
    """),
    code("""
    ROWS = ["teacher DDIM", "teacher DPM++(2M)", "LCM-LoRA, LCM"]
    show_grid([results[r, n][0][0] for r in ROWS for n in STEPS],
              [f"{r}\\n(s={TEACHER_S:g})" if r.startswith("teacher") else f"{r}\\n(s=1)" for r in ROWS],
              [f"{n} step{'s' * (n > 1)}" for n in STEPS], title=f"'{PROMPTS[0]}'", size=1.3)

    fig, ax = plt.subplots(figsize=(4.5, 2.6))
    for r in ROWS:
        ax.plot(STEPS, [results[r, n][1] for n in STEPS], "o-", label=r)
    ax.axhline(reference[1], color="gray", ls="--", label="teacher DDIM, 25 steps")
    ax.set_xscale("log", base=2), ax.set_xticks(STEPS, STEPS), ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("steps"), ax.set_ylabel(f"prompt accuracy ({len(PROMPTS)} prompts)"), ax.legend(fontsize=6)
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    The table counts what each setting costs at 4 steps: UNet forwards, the batch of each forward
    (the prompt batch $B$ doubles under CFG), and the timesteps at which the UNet ran. DPM-Solver-2's
    intermediate times are continuous.
    """),
    code("""
    B = len(PROMPTS)
    print(f"{'setting (4 steps)':24s} {'UNet calls':>10s} {'batch':>6s} {'image-NFE':>9s}  timesteps")
    for key in [("teacher DDIM", 4), ("teacher DPM++(2M)", 4), ("teacher DPM-Solver-2", 4),
                ("LCM-LoRA, LCM", 4), ("LCM-LoRA, LCM s=1.5", 4)]:
        calls = results[key][2]
        ts = ", ".join(f"{t:.0f}" if float(t).is_integer() else f"{t:.1f}" for _, t in calls)
        print(f"{key[0]:24s} {len(calls):10d} {calls[0][0] // B:>5d}B {sum(b for b, _ in calls) // B:9d}  [{ts}]")
    """),
]

#----------------------------------------------------------------------------
# 3. One LCD step.

LCD = [
    md(r"""
    # One Latent Consistency Distillation step, line by line

    Algorithm 1 of the LCM-LoRA report (PAPER.md Sec. 3), for one batch:

    ```
    sample (z, c) ~ D_z,  n ~ U[1, N - k],  w ~ U[w_min, w_max]
    z_{t_{n+k}} ~ N(alpha(t_{n+k}) z, sigma(t_{n+k})^2 I)
    z_hat_{t_n} <- z_{t_{n+k}} + (1+w) Psi(z_{t_{n+k}}, t_{n+k}, t_n, c) - w Psi(z_{t_{n+k}}, t_{n+k}, t_n, uncond)
    L <- d( f_theta(z_{t_{n+k}}, w, c, t_{n+k}),  f_theta_minus(z_hat_{t_n}, w, c, t_n) )
    theta <- theta - eta grad L;   theta_minus <- stopgrad(mu theta_minus + (1 - mu) theta)
    ```

    For an LCM-LoRA the three networks are one UNet (PAPER.md Sec. 3.2): the **student** is the
    LoRA UNet, the **target** $\theta^-$ is the same UNet under `no_grad` ($\mu = 0$), the
    **teacher** is the UNet with adapters disabled. The loss itself is `lcm/distill.py`; this
    notebook calls its pieces one at a time and checks the result against `lcd_loss`.
    """),
    code(SETUP),
    code("""
    from lcm import demo_world
    from lcm.consistency import boundary_scalings, f_theta
    from lcm.distill import (LoRAConfig, UNetCond, build_roles, distance, draw_points, lcd_loss, net_fn,
                             teacher_ddim_estimate)
    from lcm.pipeline import Pipeline
    from solvers.ddim import ddim_from_x0_eps, ddim_step
    from solvers.schedule import lcm_grid
    from solvers.wrappers import cfg, to_eps, to_x0

    pipe = Pipeline.from_checkpoint(os.path.join(DEMO, "demo_teacher.safetensors"))
    S, pred_type = pipe.schedule, pipe.prediction_type
    # The trainer's roles for mode=lcm_lora, continuing from the demo LCM-LoRA (fp32, trainable).
    roles = build_roles(pipe, "lcm_lora", LoRAConfig(name="lcm", init_from=os.path.join(DEMO, "demo_lcm_lora.safetensors")))
    assert roles.student is roles.target is roles.teacher   # one UNet in memory

    student = net_fn(roles.student, None)              # net(x, t, cond, w) -> raw UNet output (no w input)
    target = net_fn(roles.target, None)                # called under no_grad (mu = 0)
    _base = net_fn(roles.teacher, None)


    def teacher(*args):                                # the same UNet with adapters disabled
        with roles.teacher_ctx():
            return _base(*args)
    """),
    md(r"""
    ## Step 1: encode, $z = \text{vae\_scale} \cdot E(x)$

    A posterior *sample*, not the mean. $c$ is the encoded caption; the unconditional embedding is
    the encoded empty prompt (SD1/SD2 and the demo model).
    """),
    code("""
    pairs = [demo_world.sample(seed=0, index=i, resolution=pipe.default_size) for i in (3, 8)]
    x = torch.stack([img for _, img in pairs])                     # (B, 3, H, W) in [-1, 1]
    captions = [demo_world.caption(a) for a, _ in pairs]
    z = pipe.vae.encode(x).sample(generator=torch.Generator().manual_seed(0)) * pipe.vae_scale
    cond = UNetCond(pipe.encode_prompt(captions).context)
    uncond = UNetCond(pipe.encode_prompt([""] * len(captions)).context)
    print(captions, tuple(z.shape))
    """),
    md(r"""
    ## Steps 2-4: grid, skipping step, guidance, noise

    The grid is $t_j = jk - 1$ for $j = 1..N$ with $N = 50$, $k = 1000 / N = 20$: $\{19, 39, \ldots, 999\}$.
    Each sample draws $j$, so $t_{n+k} = t_j$ and $t_n = t_{n+k} - k$ ($-1$ clamped to $0$). Then
    $w = w_{min} + (w_{max} - w_{min}) u$ (LCM convention, $w = s - 1$), and
    $z_{t_{n+k}} = \alpha_{t_{n+k}} z + \sigma_{t_{n+k}} \epsilon$.
    """),
    code("""
    K, W_MIN, W_MAX, SEED = 20, 5.0, 15.0, 7
    print("grid:", lcm_grid(1000 // K)[:4], "...", lcm_grid(1000 // K)[-2:])

    t_nk, t_n, u, eps = draw_points(z, S, K, torch.Generator().manual_seed(SEED))
    w = (W_MIN + (W_MAX - W_MIN) * u).float()                      # w ~ U[w_min, w_max]
    z_nk = S.add_noise(z, eps, t_nk)                               # z_{t_{n+k}}
    print("t_nk =", t_nk.tolist(), " t_n =", t_n.tolist(), " w =", [round(v, 2) for v in w.tolist()])
    """),
    md(r"""
    ## Step 5: the student, $f_\theta(z_{t_{n+k}}, t_{n+k}) = c_{skip} z_{t_{n+k}} + c_{out} \hat x_0$

    With gradient. The LCM-LoRA has no $w$ input: the guidance is frozen into the LoRA.
    """),
    code("""
    lora_params = [p for _, p in roles.trainables]              # A_i, B_i of the LCM-LoRA, fp32
    with torch.enable_grad():
        out = student(z_nk, t_nk, cond, w)
        x0_s = to_x0(out, z_nk, t_nk, S, pred_type)
        pred = f_theta(z_nk, x0_s, t_nk, pipe.spec)
    c_skip, c_out = boundary_scalings(t_nk, pipe.spec.sigma_data, pipe.spec.timestep_scaling)
    print("c_skip(t_nk) =", [f"{v:.2e}" for v in c_skip.tolist()],
          " 1 - c_out =", [f"{1 - v:.2e}" for v in c_out.tolist()], " student requires grad:", pred.requires_grad)
    """),
    md(r"""
    ## Step 6: the teacher's guided DDIM step, three ways

    1. **Algorithm 1**: $\hat z_{t_n} = z + (1+w)\Psi(c) - w\Psi(\varnothing)$, where
       $\Psi(\cdot) = \text{DDIM}(z, t_{n+k} \to t_n) - z$ is the solver's increment.
    2. **The module** (`teacher_ddim_estimate`): combine $\hat x_0^w = \hat x_0^c + w(\hat x_0^c - \hat x_0^\varnothing)$ and
       $\hat\epsilon^w$ likewise, then one DDIM step
       $\hat z_{t_n} = \sqrt{\bar\alpha_{t_n}}\hat x_0^w + \sqrt{1-\bar\alpha_{t_n}}\hat\epsilon^w$.
    3. **Usual CFG** (Imagen, diffusers): $\hat\epsilon = \hat\epsilon^\varnothing + s(\hat\epsilon^c - \hat\epsilon^\varnothing)$, then DDIM.

    They agree exactly when $s = w + 1$, because DDIM is linear in $(\hat x_0, \hat\epsilon)$ and the
    conversions are affine with weights summing to 1. Reading the LCM $w$ as $s$ is an
    off-by-one in the guidance, and it visibly moves $\hat z_{t_n}$.
    """),
    code("""
    # The teacher's two passes at t_{n+k}: conditional and unconditional.
    out_c, out_u = teacher(z_nk, t_nk, cond, w), teacher(z_nk, t_nk, uncond, w)
    x0_c, x0_u = to_x0(out_c, z_nk, t_nk, S, pred_type), to_x0(out_u, z_nk, t_nk, S, pred_type)
    eps_c, eps_u = to_eps(out_c, z_nk, t_nk, S, pred_type), to_eps(out_u, z_nk, t_nk, S, pred_type)
    wb = w[:, None, None, None]

    psi = lambda x0, e: ddim_from_x0_eps(x0, e, t_n, S) - z_nk                  # Psi: DDIM increment
    z_hat_alg1 = z_nk + (1 + wb) * psi(x0_c, eps_c) - wb * psi(x0_u, eps_u)     # 1. Algorithm 1
    z_hat = teacher_ddim_estimate(teacher, S, pred_type)(z_nk, t_nk, t_n, z, eps, cond, uncond, w)  # 2.
    eps_cfg = cfg(eps_c, eps_u, wb + 1)                                        # 3. uncond + s (cond - uncond)
    z_hat_cfg = ddim_step(z_nk, eps_cfg, t_nk, t_n, S)
    z_hat_wrong = ddim_step(z_nk, cfg(eps_c, eps_u, wb), t_nk, t_n, S)          # s = w: off by one

    scale = z_hat.abs().max().item()
    print(f"|Alg. 1 - module|        = {(z_hat_alg1 - z_hat).abs().max().item():.2e}   (max |z_hat| = {scale:.2f})")
    print(f"|usual CFG, s=w+1 - mod.| = {(z_hat_cfg - z_hat).abs().max().item():.2e}")
    print(f"|usual CFG, s=w   - mod.| = {(z_hat_wrong - z_hat).abs().max().item():.2e}   <- the convention matters")
    assert (z_hat_alg1 - z_hat).abs().max() <= 1e-4 * max(1, scale)
    assert (z_hat_cfg - z_hat).abs().max() <= 1e-4 * max(1, scale)
    """),
    md(r"""
    ## Steps 7-8: target and loss

    Target: $f_{\theta^-}(\hat z_{t_n}, t_n)$, without gradient (for $t_n = 0$ it is $\hat z_{t_n}$
    itself). Loss: the pseudo-Huber distance $d(a, b) = \text{mean}(\sqrt{(a-b)^2 + c^2} - c)$, $c = 0.001$
    (or $\ell_2$), per sample. The whole trace must equal `lcd_loss` called with the same generator seed.
    """),
    code("""
    out_t = target(z_hat, t_n, cond, w)                            # no grad (global default here)
    target_f = f_theta(z_hat, to_x0(out_t, z_hat, t_n, S, pred_type), t_n, pipe.spec)
    with torch.enable_grad():
        loss = distance(pred, target_f, "huber", 1e-3)             # per sample (B,)
        ref, info = lcd_loss(student, target, teacher_ddim_estimate(teacher, S, pred_type), z, cond, uncond, S,
                             torch.Generator().manual_seed(SEED), k=K, w_min=W_MIN, w_max=W_MAX, loss="huber",
                             huber_c=1e-3, prediction_type=pred_type, sigma_data=pipe.spec.sigma_data,
                             timestep_scaling=pipe.spec.timestep_scaling)
    print("traced loss:", loss.tolist())
    print("lcd_loss:   ", ref.tolist())
    print("l2 instead: ", distance(pred, target_f, "l2").tolist())
    assert torch.equal(info["t_nk"], t_nk) and torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    lat = torch.stack([z, z_nk, z_hat, target_f, pred.detach()], 1).flatten(0, 1)   # (B * 5, 4, h, w)
    show_grid(pipe.decode(lat), [f"t_nk={a}, t_n={b}" for a, b in zip(t_nk.tolist(), t_n.tolist())],
              ["z (clean)", "z at t_nk", "z_hat at t_n", "target", "student"], size=1.0)
    """),
    md(r"""
    ## Step 9: update

    Gradients flow through the student only (the teacher step and the target ran without grad);
    clip the norm at 1.0 and step AdamW on the LoRA parameters. For an LCM-LoRA there is no EMA:
    the next target is simply the updated UNet.
    """),
    code("""
    with torch.enable_grad():
        loss.mean().backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
    opt = torch.optim.AdamW(lora_params, lr=1e-4)
    opt.step()
    with torch.enable_grad():
        after, _ = lcd_loss(student, target, teacher_ddim_estimate(teacher, S, pred_type), z, cond, uncond, S,
                            torch.Generator().manual_seed(SEED), k=K, w_min=W_MIN, w_max=W_MAX,
                            prediction_type=pred_type)
    print(f"grad norm {grad_norm:.3g} over {sum(p.numel() for p in lora_params)} LoRA parameters; "
          f"loss {loss.mean().item():.4g} -> {after.mean().item():.4g} (same draws)")
    """),
    md(r"""
    ## Move $w$ or $k$ and watch the target

    Fix one sample, $t_{n+k} = 499$ and its noise. $\hat z_{t_n}$ is exactly linear in $w$ (CFG is
    linear), so the target moves with $w$; a larger skip $k$ asks the student to agree with a target
    further down the trajectory (one long teacher step instead of a short one).
    """),
    code("""
    T_NK = 499
    z1, e1, c1, u1 = z[:1], eps[:1], UNetCond(cond.context[:1]), UNetCond(uncond.context[:1])
    zt = S.add_noise(z1, e1, torch.tensor([T_NK]))
    estimate = teacher_ddim_estimate(teacher, S, pred_type)
    pred1 = f_theta(zt, to_x0(student(zt, torch.tensor([T_NK]), c1, None), zt, T_NK, S, pred_type), T_NK, pipe.spec)


    def target_at(k, w):
        \"\"\"Targets (n, 4, h, w) for n settings of (k, w) from the same z_{t_{n+k}}.\"\"\"
        n = len(k)
        t_nk_, t_n_ = torch.full((n,), T_NK), (T_NK - torch.tensor(k)).clamp(min=0)   # the grid rule of draw_points
        cn, un = UNetCond(c1.context.expand(n, -1, -1)), UNetCond(u1.context.expand(n, -1, -1))
        zn = zt.expand(n, -1, -1, -1)
        zh = estimate(zn, t_nk_, t_n_, z1.expand_as(zn), e1.expand_as(zn), cn, un, torch.tensor(w).float())
        return f_theta(zh, to_x0(target(zh, t_n_, cn, None), zh, t_n_, S, pred_type), t_n_, pipe.spec)


    WS, KS = [0.0, 1.0, 2.0, 4.0, 7.5, 10.0, 15.0], [1, 5, 10, 20, 50, 100]
    tw = target_at([K] * len(WS), WS)
    tk = target_at(KS, [7.5] * len(KS))
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.5))
    axes[0].plot(WS, distance(pred1.expand_as(tw), tw, "huber"), "o-", label="loss d(student, target)")
    moved = (tw - tw[:1]).flatten(1).norm(dim=1) / tw[0].norm()
    axes[0].plot(WS, moved, "s--", label="|target(w) - target(0)| / |target(0)|")
    axes[0].set_xlabel(f"w (k = {K})"), axes[0].legend(fontsize=6)
    axes[1].plot(KS, distance(pred1.expand_as(tk), tk, "huber"), "o-", label="loss d(student, target)")
    axes[1].set_xscale("log"), axes[1].set_xlabel("k (w = 7.5)"), axes[1].legend(fontsize=6)
    fig.suptitle(f"t_{{n+k}} = {T_NK}: '{captions[0]}'")
    fig.tight_layout()
    plt.show()
    show_grid(pipe.decode(torch.cat([pred1, tw])), [f"k = {K}"], ["student"] + [f"target, w={v:g}" for v in WS], size=1.0)
    show_grid(pipe.decode(torch.cat([pred1, tk])), ["w = 7.5"], ["student"] + [f"target, k={v}" for v in KS], size=1.0)
    """),
]

#----------------------------------------------------------------------------
# 4. LoRA task arithmetic.

LORA = [
    md(r"""
    # LoRA and task arithmetic: the acceleration vector

    A LoRA adds a low-rank update to a frozen weight (PAPER.md Sec. 5):

    $$h = W_0 x + \frac{\alpha}{r} B A x, \qquad A \in \mathbb R^{r \times k},\ B \in \mathbb R^{d \times r},\ \Delta W = \frac{\alpha}{r} B A .$$

    $B$ starts at zero, so training starts from the base model. The LCM-LoRA report treats
    $\tau_{LCM} = \theta_{LCM} - \theta_{pre}$ as an **acceleration vector** and adds it to a
    style LoRA $\tau'$ without further training (Eqs. 2-3):

    $$\theta'_{LCM} = \theta_{pre} + \lambda_1 \tau' + \lambda_2 \tau_{LCM}.$$

    Code: `models/lora.py` (`LoRALinear`, `LoRAConv2d`, `set_lora_scales`, `fuse_lora`, `unfuse_lora`),
    `models/lora_io.py` (files), `lcm/pipeline.py` (`load_lora`, `set_lora_scales`).
    """),
    code(SETUP),
    md(r"""
    ## One layer: $\Delta W = (\alpha / r) B A$, rank and alpha

    A fresh adapter changes nothing ($B = 0$). Once $B \ne 0$, $\Delta W$ has rank $r$, and
    $\alpha$ only rescales it: $\alpha / r$ is a fixed multiplier stored with the file, separate
    from the runtime scale $\lambda$. A conv LoRA uses a conv $A$ (the base kernel) and a 1x1 $B$.
    """),
    code("""
    import torch.nn.functional as F
    from torch import nn

    from models.lora import LoRAConv2d, LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24))
    x = torch.randn(5, 32)
    y0 = layer(x)
    A, B = layer.add_adapter("a", rank=4, alpha=8)                 # A (4, 32) random, B (24, 4) zero
    assert torch.equal(layer(x), y0)                               # B = 0: the base model
    B.data.normal_()                                               # pretend it was trained
    dW = layer.delta_weight("a")                                   # (alpha / r) B A
    assert torch.allclose(dW, 8 / 4 * B @ A)
    assert torch.allclose(layer(x), F.linear(x, layer.weight + dW, layer.bias), atol=1e-5)
    print("rank of dW:", torch.linalg.matrix_rank(dW).item(), "| shapes A", tuple(A.shape), "B", tuple(B.shape))
    layer.lora_alpha["a"] = 16.0                                   # alpha 8 -> 16 doubles dW
    assert torch.allclose(layer.delta_weight("a"), 2 * dW)

    conv = LoRAConv2d(nn.Conv2d(8, 16, 3, padding=1))
    A, B = conv.add_adapter("a", rank=2, alpha=2)
    B.data.normal_()
    print("conv: A", tuple(A.shape), "B", tuple(B.shape), "dW", tuple(conv.delta_weight("a").shape),
          "rank", torch.linalg.matrix_rank(conv.delta_weight("a").flatten(1)).item())
    """),
    md(r"""
    ## The demo LoRAs

    The demo's LCM-LoRA (the acceleration vector) and style LoRA (trained by ordinary diffusion
    fine-tuning on the "outlined" demo style) are kohya-format files. Each module's $\Delta W$ has
    exactly $r$ non-zero singular values.
    """),
    code("""
    from lcm.pipeline import Pipeline
    from models import lora as lora_lib

    pipe = Pipeline.from_checkpoint(os.path.join(DEMO, "demo_teacher.safetensors"))
    pipe.load_lora(os.path.join(DEMO, "demo_lcm_lora.safetensors"), name="lcm")
    pipe.load_lora(os.path.join(DEMO, "demo_style_lora.safetensors"), name="style")
    layers = dict(lora_lib.lora_layers(pipe.unet))
    for name in ("lcm", "style"):
        n_params, n_modules = lora_lib.count_lora_params(pipe.unet, name)
        ranks = {m.lora_down[name].weight.shape[0] for m in layers.values() if name in m.lora_down}
        alphas = {m.lora_alpha[name] for m in layers.values() if name in m.lora_alpha}
        print(f"{name:6s}: {n_modules} modules, {n_params:,} parameters, ranks {sorted(ranks)}, alphas {sorted(alphas)}")

    fig, ax = plt.subplots(figsize=(4.5, 2.5))
    for name, style in [("lcm", "-"), ("style", "--")]:
        mod = next(n for n, m in layers.items() if name in m.lora_down and m.weight.ndim == 2)
        sv = torch.linalg.svdvals(layers[mod].delta_weight(name).flatten(1))
        r = layers[mod].lora_down[name].weight.shape[0]
        ax.semilogy(sv[: 2 * r + 2] + 1e-12, style + "o", ms=3, label=f"{name}: {mod} (r={r})")
    ax.set_xlabel("index"), ax.set_ylabel("singular value of dW"), ax.legend(fontsize=5)
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## Merging: fused = unfused, and unfuse is exact

    Fusing bakes $W = W_0 + \sum_i \lambda_i \Delta W_i$ into the weights (one matmul per layer at
    inference instead of the extra branches); it must give the same outputs. Unfusing restores $W_0$
    bit for bit. Changing a scale while fused re-fuses from $W_0$, so outputs follow the scales.
    """),
    code("""
    h = pipe.default_size // pipe.latent_factor
    xb = torch.randn(2, pipe.unet.in_channels, h, h, generator=torch.Generator().manual_seed(0))
    tb = torch.tensor([999, 259])
    ctx = pipe.encode_prompt(["a small red circle at the top left on a blue background"] * 2).context
    w0 = {k: v.clone() for k, v in pipe.unet.state_dict().items() if not lora_lib.is_lora_key(k)}

    pipe.set_lora_scales({"lcm": 1.0, "style": 0.8})
    unfused = pipe.unet(xb, tb, ctx)
    pipe.fuse_lora()
    fused = pipe.unet(xb, tb, ctx)
    err = (fused - unfused).abs().max().item()
    print(f"max |fused - unfused| = {err:.2e}  (max |out| = {unfused.abs().max().item():.2f})")
    assert err <= 1e-4 * max(1.0, unfused.abs().max().item())

    pipe.set_lora_scales({"style": 0.0})                           # re-fuses: now W0 + dW_lcm
    mod, layer = next((n, m) for n, m in layers.items() if "lcm" in m.lora_down)
    assert torch.allclose(layer.weight, w0[mod + ".weight"] + layer.delta_weight("lcm"), atol=1e-6)

    pipe.unfuse_lora()
    same = all(torch.equal(v, w0[k]) for k, v in pipe.unet.state_dict().items() if k in w0)
    print("unfuse restores W0 bit for bit:", same)
    assert same
    """),
    md(r"""
    ## $\lambda_1 \tau' + \lambda_2 \tau_{LCM}$ on the demo model

    Rows: style scale $\lambda_1$; columns: acceleration scale $\lambda_2$; every cell samples with
    LCM in 4 steps at $s = 1$. Without the acceleration vector ($\lambda_2 = 0$) the base model cannot
    sample in 4 LCM steps; with it, the style vector controls the style. Titles: the demo evaluator's
    style accuracy (fraction of a fixed prompt set recognised as "outlined").
    """),
    code("""
    from lcm import demo_world
    from lcm.demo_eval import DemoEvaluator

    evaluator = DemoEvaluator.load(os.path.join(DEMO, "demo_evaluator.safetensors"))
    STYLE = "outlined"
    PROMPTS = demo_world.fixed_prompt_set(8)
    L1, L2 = [0.0, 0.5, 0.8, 1.0], [0.0, 0.5, 1.0]

    cells, accs = [], []
    for l1 in L1:
        for l2 in L2:
            pipe.set_lora_scales({"style": l1, "lcm": l2})        # W0 + l1 dW_style + l2 dW_lcm
            imgs = pipe(PROMPTS, steps=4, solver="lcm", seed=0, output="tensor", progress=False)
            cells.append(imgs[0])
            accs.append(evaluator.style_accuracy(imgs * 2 - 1, STYLE))

    fig, axes = plt.subplots(len(L1), len(L2), figsize=(1.5 * len(L2), 1.5 * len(L1) + 0.3), squeeze=False)
    for ax, img, acc, (l1, l2) in zip(axes.flat, cells, accs, [(a, b) for a in L1 for b in L2]):
        ax.imshow(img.permute(1, 2, 0).numpy()), ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"l1={l1:g} l2={l2:g}\\n{STYLE} {acc:.0%}", fontsize=7)
    fig.suptitle(f"LCM 4 steps: '{PROMPTS[0]}'")
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## Baseline: the style LoRA alone with DPM-Solver++

    The report's Fig. 3 baseline: the style LoRA without the acceleration vector, sampled by
    DPM-Solver++(2M) with CFG. It needs many more steps, and CFG doubles the cost of each.
    """),
    code("""
    lora_lib.remove_lora(pipe.unet, "lcm")                        # the style LoRA alone
    pipe.set_lora_scales({"style": 0.8})
    BASE_STEPS, BASE_S = [2, 4, 8, 16], 7.5
    imgs, accs = [], []
    for n in BASE_STEPS:
        out = pipe(PROMPTS, steps=n, solver="dpmsolver++", guidance_scale=BASE_S, seed=0, output="tensor", progress=False)
        imgs.append(out[0])
        accs.append(evaluator.style_accuracy(out * 2 - 1, STYLE))
    show_grid(imgs, [f"style 0.8\\nDPM++ s={BASE_S:g}"], [f"{n} steps, {a:.0%}" for n, a in zip(BASE_STEPS, accs)],
              size=1.3)
    """),
]

NOTEBOOKS = {
    "consistency_function.ipynb": CONSISTENCY,
    "pf_ode_solvers.ipynb": SOLVERS,
    "lcd_step.ipynb": LCD,
    "lora_task_arithmetic.ipynb": LORA,
}


def build(cells) -> nbformat.NotebookNode:
    """A fresh notebook (no outputs) for the project's venv kernel."""
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i:02d}"                           # stable ids: rebuilding changes nothing
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(NOTEBOOKS[name])) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a notebook is stale")
    args = p.parse_args()
    stale = []
    for name in NOTEBOOKS:
        path = os.path.join(HERE, name)
        text = render(name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(name)
            if not args.check:
                with open(path, "w") as f:
                    f.write(text)
    if args.check and stale:
        print(f"stale notebooks (run python notebooks/build_notebooks.py): {stale}", file=sys.stderr)
        return 1
    print(("stale: " if args.check else "written: ") + (", ".join(stale) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

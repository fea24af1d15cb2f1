"""Source of notebooks/consistency_function.ipynb: 1. The consistency function."""
from nbcells import SETUP, code, md

#----------------------------------------------------------------------------
# 1. The consistency function.

CELLS = [
    md(r"""
    # The consistency function of LCM

    A consistency model learns a function $f$ that maps every point of a probability-flow ODE
    (PF-ODE) trajectory to the trajectory's clean end point $x_\epsilon$:

    $$f(x_t, t) = f(x_{t'}, t') \quad \text{for all } t, t' \text{ on one trajectory}, \qquad f(x_\epsilon, \epsilon) = x_\epsilon .$$

    LCM (docs/method.md Sec. 2) parameterises it on SD latents with the denoiser's clean-latent
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
    axes[0].set_xlabel("t (raw timestep)"), axes[0].set_ylabel("c_skip(t), c_out(t)"), axes[0].legend(fontsize=6)
    axes[0].set_title("boundary scalings near t = 0 (solid: timestep scaling 10)")
    axes[1].set_xlabel("t (raw timestep)"), axes[1].set_ylabel("c_skip(t)"), axes[1].legend(fontsize=6)
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
    LCM-LoRA distils it (docs/method.md Sec. 3). Below, a real demo image is encoded,
    $z = \text{vae\_scale}\cdot E(x)$, noised with one $\epsilon$ to $z_t = \alpha_t z + \sigma_t \epsilon$,
    and mapped back by

    * the teacher's guided one-step estimate $\hat x_0(z_t, t)$ (LoRA disabled, CFG with scale $s$),
    * the LCM: $f_\theta(z_t, t)$ with the LCM-LoRA (no CFG: the guidance is distilled in).

    Every picture is a latent decoded by the VAE.
    """),
    code("""
    from demo import world
    from lcm.pipeline import Pipeline
    from models.lora import adapters_disabled
    from solvers.wrappers import make_x0_fn

    pipe = Pipeline.from_checkpoint(os.path.join(DEMO, "demo_teacher.safetensors"))
    pipe.load_lora(os.path.join(DEMO, "demo_lcm_lora.safetensors"), name="lcm")
    S, spec = pipe.schedule, pipe.spec
    TEACHER_S = 7.5                                  # teacher CFG scale s (= w + 1 in LCM's convention)

    attrs, x = world.sample(seed=0, index=3, resolution=pipe.default_size)
    prompt = world.caption(attrs)
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
    ax.invert_xaxis(), ax.set_xlabel("t along the trajectory"), ax.set_ylabel("|f(z_t, t) - z_end| / |z_end|")
    ax.set_title("distance to the DDIM end point (one trajectory, seed 2)")
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

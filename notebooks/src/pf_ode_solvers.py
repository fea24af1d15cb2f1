"""Source of notebooks/pf_ode_solvers.ipynb: 2. PF-ODE solvers."""
from nbcells import SETUP, code, md

#----------------------------------------------------------------------------
# 2. PF-ODE solvers.

CELLS = [
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
      next timestep with fresh noise (docs/method.md Sec. 7).

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
    ax.set_xlabel("NFE (model calls)"), ax.set_ylabel("RMS error vs the exact ODE solution"), ax.legend(fontsize=6)
    ax.set_title(f"Gaussian data: error at t = 0 along {len(x_T)} trajectories (float64)")
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
    `demo.evaluator.frechet_distance`). Two floors appear:

    * the **Monte-Carlo floor** (exact samples of $p_0$, same count);
    * the **prior mismatch**: every sampler starts from $\mathcal N(0, I)$, but
      $p_{999} = \mathcal N(\alpha_{999}\mu, \ldots)$ with $\alpha_{999} = 0.068$. Even the exact ODE
      carries this error to $t = 0$. LCM's re-noising draws fresh $z_{\tau_{i+1}}$ from (almost) the
      right marginal, so multistep LCM sheds most of it.
    """),
    code("""
    from demo.evaluator import FeatureStats, feature_stats, frechet_distance

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
    ax.set_xlabel("NFE (model calls)"), ax.set_ylabel("Frechet distance to p_0"), ax.legend(fontsize=6)
    ax.set_title(f"Gaussian data: distribution error of {N} samples")
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
    ax.set_title("where a budget of 12 model calls goes (LCM: 4 steps of one call)")
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## The teacher solver $\Psi$ of LCD

    LCD's target needs $\hat z_{t_n} = \Psi(z_{t_{n+k}}, t_{n+k}, t_n)$, **one** step of the guided teacher
    $(1 + w)\,\hat\epsilon(z, c) - w\,\hat\epsilon(z, \varnothing)$ across the skipping step $k$ on the grid
    $t_j = jk - 1$; below is the trainer's own $\Psi$ (`lcm.objectives.teacher.teacher_estimate`,
    `objective.teacher_solver`) on the Gaussian teacher, where $c = \varnothing$ makes the guided $\hat\epsilon$ exact
    and the exact step is the flow, from $z_{t_{n+k}} \sim p_{t_{n+k}}$ at every grid point.
    DDIM's local error grows like $h^2$ and the second-order DPM-Solver-2 and DPM-Solver++(2S) like
    $h^3$ ($h = \lambda_{t_n} - \lambda_{t_{n+k}}$, roughly $\propto k$), so the gap widens with $k$, which is why
    the LCM paper found DPM-Solver(++) better than DDIM at $k = 50$.
    The price: a second-order $\Psi$ evaluates the guided teacher twice (at $t_{n+k}$ and at the midpoint),
    4 teacher UNet calls per training step (cond + uncond each time) instead of 2.
    The last interval ($k - 1 \to 0$, e.g. $19 \to 0$ at $k = 20$) has a large $h$ because $\lambda_t$ jumps
    near $t = 0$: it has the largest error of the grid (dotted) and would dominate a mean, so the solid
    lines are the median over the grid.
    """),
    code("""
    from lcm.objectives.teacher import teacher_estimate
    from lcm.sampling.samplers import TEACHER_SOLVERS
    from models.text import Conditioning


    def gauss_teacher(x, t, cond, w):
        \"\"\"A teacher net(x, t, cond, w) -> exact Gaussian eps, each sample at its own t (B,).\"\"\"
        return gauss_eps(x, t.reshape(-1, 1).double())


    KS = [1, 5, 10, 20, 50]
    psi_med, psi_last = {s: [] for s in TEACHER_SOLVERS}, {s: [] for s in TEACHER_SOLVERS}
    for k in KS:
        t_nk = torch.arange(1, S.T // k + 1) * k - 1               # grid t_{n+k} = j k - 1, j = 1..T/k
        t_n = (t_nk - k).clamp(min=0)
        t_nk, t_n = t_nk[t_nk > t_n], t_n[t_nk > t_n]              # drop the empty step 0 -> 0 (k = 1)
        B, tcol = len(t_nk), lambda t: t.double().reshape(-1, 1)
        z = S.alpha(tcol(t_nk)) * MU + marginal_std(tcol(t_nk)) * torch.randn(
            B, D, generator=torch.Generator().manual_seed(k), dtype=torch.float64)   # z ~ p_{t_{n+k}}
        c, w = Conditioning(torch.zeros(B, 1, 1, dtype=torch.float64)), torch.full((B,), 7.0, dtype=torch.float64)
        exact = gauss_flow(z, tcol(t_nk), tcol(t_n))
        for s in TEACHER_SOLVERS:
            z_hat = teacher_estimate(gauss_teacher, S, "epsilon", s)(z, t_nk, t_n, None, None, c, c, w)
            err = (z_hat - exact).pow(2).mean(1).sqrt()               # RMS over D, one per grid point
            psi_med[s].append(err.median().item())
            psi_last[s].append(err[t_n == 0].max().item())          # the last interval k - 1 -> 0

    fig, ax = plt.subplots(figsize=(4.8, 3))
    for i, (s, mark) in enumerate(zip(TEACHER_SOLVERS, ["o-", "s-", "x--"])):
        ax.loglog(KS, psi_med[s], mark, ms=4, color=f"C{i}", label=f"{s} (median over the grid)")
        ax.loglog(KS, psi_last[s], ":", color=f"C{i}", alpha=0.7)
    for p, ref in [(2, psi_med["ddim"][0]), (3, psi_med["dpmsolver"][0])]:   # reference slopes, offset x0.2
        ax.loglog(KS, [0.2 * ref * k**p for k in KS], color="gray", lw=0.7, ls="--")
        ax.text(KS[-2], 0.2 * ref * KS[-2] ** p, f"k^{p}  ", fontsize=7, ha="right", va="top")
    ax.set_xlabel("skipping step k"), ax.set_ylabel("one-step RMS error |Psi(z) - flow(z)|")
    ax.set_title("dotted: the last interval k-1 -> 0"), ax.legend(fontsize=6)
    fig.tight_layout()
    plt.show()

    print(f"{'k':>3s}  " + "  ".join(f"{s + ' med':>15s} {'last':>9s}" for s in TEACHER_SOLVERS))
    for i, k in enumerate(KS):
        print(f"{k:3d}  " + "  ".join(f"{psi_med[s][i]:15.2e} {psi_last[s][i]:9.2e}" for s in TEACHER_SOLVERS))
    print("guided teacher UNet calls per training step:", dict(TEACHER_SOLVERS))
    """),
    md(r"""
    ## The same solvers on the demo model

    The teacher samples with DDIM and DPM-Solver++(2M) under CFG with scale $s$ (two UNet passes
    per call: conditional and unconditional, batched). The teacher + LCM-LoRA samples with LCM at
    $s = 1$ (one pass). The demo evaluator scores each setting on a fixed set of prompts
    ("accuracy": every content attribute of the prompt recognised; see `demo/evaluator.py`).
    """),
    code("""
    from demo import world
    from demo.evaluator import DemoEvaluator
    from lcm.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(os.path.join(DEMO, "demo_teacher.safetensors"))
    evaluator = DemoEvaluator.load(os.path.join(DEMO, "demo_evaluator.safetensors"))
    TEACHER_S = 7.5                                    # usual CFG scale s (LCM's w = s - 1)
    STEPS = [1, 2, 4, 8]
    PROMPTS = world.fixed_prompt_set(8)

    unet_calls = []                                    # (batch, t) of every UNet forward
    log_call = lambda m, args, out: unet_calls.append((args[0].shape[0], args[1].reshape(-1)[0].item()))
    pipe.unet.register_forward_hook(log_call)


    def generate(**kw):
        \"\"\"Sample PROMPTS; returns images (B, 3, H, W) in [0, 1], accuracy, the UNet calls made, and
        per prompt whether every attribute was recognised (B,) (for the bootstrap interval).\"\"\"
        unet_calls.clear()
        imgs = pipe(PROMPTS, seed=0, output="tensor", progress=False, **kw)
        acc = evaluator.prompt_accuracy(imgs * 2 - 1, PROMPTS)["overall"]
        ok = torch.tensor([evaluator.prompt_accuracy(im[None] * 2 - 1, [p])["overall"] for im, p in zip(imgs, PROMPTS)])
        assert abs(ok.mean().item() - acc) < 1e-6
        return imgs, acc, list(unet_calls), ok


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

    from lcm.evaluation.stats import draw, mean_replicates, percentile_interval

    boot = draw(len(PROMPTS))                          # 1000 resamples of the prompts, seeded (docs/statistics.md)
    fig, ax = plt.subplots(figsize=(6, 2.6))
    for i, r in enumerate(ROWS):
        acc = torch.tensor([results[r, n][1] for n in STEPS])
        ci = torch.tensor([percentile_interval(mean_replicates(results[r, n][3], boot)) for n in STEPS])   # (steps, 2)
        ax.errorbar([n * 1.06 ** (i - 1) for n in STEPS], acc, yerr=torch.stack([acc - ci[:, 0], ci[:, 1] - acc]),
                    fmt="o-", ms=4, capsize=2, label=r)       # x offset only to keep the bars apart
    ax.axhline(reference[1], color="gray", ls="--", label="teacher DDIM, 25 steps")
    ax.set_xscale("log", base=2), ax.set_xticks(STEPS, STEPS), ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("steps"), ax.set_ylabel(f"prompt accuracy ({len(PROMPTS)} prompts)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title("accuracy vs steps, 95% bootstrap interval over the prompts")
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

"""Source of notebooks/continuous_time.ipynb: 7. Continuous time: TrigFlow, the tangent, the JVP, LCD as k -> 0."""
from nbcells import SETUP, code, md

#----------------------------------------------------------------------------
# 7. Continuous-time consistency (sCM) on SD's discrete VP schedule.

CELLS = [
    md(r"""
    # Continuous time: TrigFlow on SD's schedule, the consistency tangent, the JVP

    sCM (Lu & Song, arXiv 2410.11081) trains a consistency model in continuous time. It writes the
    forward process in *TrigFlow* form, with $\tau \in [0, \pi/2]$ and data std $\sigma_d$,

    $$x_\tau = \cos\tau\, x_0 + \sin\tau\, z,\quad z \sim \mathcal N(0, \sigma_d^2 I), \qquad
      f_\theta(x, \tau) = \cos\tau\, x - \sigma_d \sin\tau\, F_\theta(x, \tau),$$

    so $f_\theta(x, 0) = x$ holds by construction. The teacher enters only through its PF-ODE velocity
    $dx/d\tau = \sigma_d F_{teacher}$, and the loss pushes $F_\theta$ along the normalised *tangent*

    $$g = \cos\tau\, \frac{d f_{\theta^-}}{d\tau}
        = -\cos^2\tau\,\big(\sigma_d F_{\theta^-} - \tfrac{dx}{d\tau}\big)
          - \cos\tau \sin\tau\,\big(x + \sigma_d \tfrac{d F_{\theta^-}}{d\tau}\big),
      \qquad \frac{dF}{d\tau} = \partial_x F\, \frac{dx}{d\tau} + \partial_\tau F,$$

    the total derivative of the consistency function along the teacher's ODE, computed as one
    Jacobian-vector product. If $f_{\theta^-}$ is the exact consistency map, $g = 0$.

    This notebook uses the functions the project's sCM objective (`lcm/objectives/scm.py`) uses:
    `lcm/objectives/trigflow.py` (time conversion, $F \leftrightarrow \epsilon$, `tangent`, `scm_loss`)
    and `lcm/objectives/jvp.py` (`jvp`, forward-mode or finite differences). Derivations:
    docs/method.md Sec. 15. Everything runs in float64 on the CPU, with $\sigma_d = 1$.
    """),
    code(SETUP),
    md(r"""
    ## 1. TrigFlow with $\sigma_d = 1$ is SD's VP process

    SD noises with $x_t = \alpha_t x_0 + \sigma_t \epsilon$, $\alpha_t^2 + \sigma_t^2 = 1$. With $\sigma_d = 1$ the two
    processes coincide at $\cos\tau = \alpha_t$, $\sin\tau = \sigma_t$:

    $$\tau(t) = \arccos\sqrt{\bar\alpha_t} = \operatorname{atan2}(\sigma_t, \alpha_t), \qquad F = v = \alpha_t\epsilon - \sigma_t x_0, \qquad f = \hat x_0 .$$

    The UNet only knows the integer timesteps $t = 0, \dots, 999$. A JVP needs $F_\theta$ as a
    differentiable function of $\tau$, so `t_of_tau` inverts $\lambda_t = \log(\alpha_t / \sigma_t)$ on
    the schedule interpolated piecewise-linearly in $\log\alpha_t$ (as DPM-Solver does): $t_{SD}(\tau)$
    is continuous, exact at the integers, and *piecewise smooth*, with a kink at every integer. Its
    slope $dt_{SD}/d\tau$ is large: every frequency $\omega_i$ of SD's sinusoidal time embedding
    $[\cos \omega_i t, \sin \omega_i t]$ ($\omega_{max} = 1$ rad per step) reaches $\partial_\tau F$
    multiplied by it.
    """),
    code("""
    import math

    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")   # a deprecation notice inside torch

    from lcm.objectives import trigflow as tf
    from lcm.objectives.jvp import fd_step, jvp
    from solvers.schedule import Schedule

    S = Schedule.make()                                 # SD's scaled_linear schedule, T = 1000, float64
    t = torch.arange(S.T)
    tau = tf.tau_of_t(t, S)                             # float64 (T,)
    lo, hi = tf.tau_range(S)
    print(f"tau range over t = 0..999: [{lo:.5f}, {hi:.5f}]   (pi/2 = {math.pi / 2:.5f})")
    print(f"max |tau - arccos sqrt(abar)|     = {(tau - torch.arccos(S.abar.sqrt())).abs().max():.1e}")
    print(f"max |alpha_t - cos tau|            = {(S.alpha(t) - torch.cos(tau)).abs().max():.1e}")
    print(f"max |sigma_t - sin tau|            = {(S.sigma(t) - torch.sin(tau)).abs().max():.1e}")
    print(f"max |t_SD(tau(t)) - t|, integer t  = {(tf.t_of_tau(tau, S) - t).abs().max():.1e}")
    t_mid = torch.arange(S.T - 1) + 0.5                 # float t between the knots
    print(f"max |t_SD(tau(t)) - t|, t + 1/2    = {(tf.t_of_tau(tf.tau_of_t(t_mid, S), S) - t_mid).abs().max():.1e}")

    # dt_SD / dtau with the project's forward-mode JVP through t_of_tau (what the sCM JVP differentiates).
    t_of = lambda a: tf.t_of_tau(a, S)
    _, dt_dtau = jvp(t_of, (tf.tau_of_t(t_mid, S),), (torch.ones(S.T - 1, dtype=torch.float64),))
    print("\\n   t_SD   dt_SD/dtau   (mid-piece, between two integer knots)")
    for tm in (0.5, 249.5, 499.5, 749.5, 998.5):
        print(f"{tm:7.1f}   {dt_dtau[int(tm)]:10.1f}")
    # The kink at an integer knot: one-sided slopes at t = 500.
    tk, eps = tf.tau_of_t(500, S), 1e-7
    left, right = ((t_of(tk + d) - t_of(tk)) / d for d in (-eps, eps))
    print(f"\\nat the knot t = 500: left slope {left:.2f}, right slope {right:.2f} "
          f"(relative jump {abs(right / left - 1):.1e})")
    """),
    code("""
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 2.6))
    axes[0].plot(t, tau, label="tau(t)")
    axes[0].plot(t, S.alpha(t), "--", label="alpha_t = cos tau")
    axes[0].plot(t, S.sigma(t), ":", label="sigma_t = sin tau")
    axes[0].axhline(math.pi / 2, color="gray", lw=0.6)
    axes[0].set_xlabel("SD timestep t"), axes[0].set_ylabel("tau (rad), alpha_t, sigma_t")
    axes[0].legend(fontsize=6), axes[0].set_title("TrigFlow time of SD's schedule (grey: pi/2)")
    axes[1].semilogy(t_mid, dt_dtau)
    axes[1].set_xlabel("SD timestep t (mid-piece)"), axes[1].set_ylabel("dt_SD / dtau")
    axes[1].set_title("dt_SD / dtau: the time tangent's gain")
    zoom = torch.linspace(tf.tau_of_t(496.6, S).item(), tf.tau_of_t(503.4, S).item(), 1500, dtype=torch.float64)
    _, dz = jvp(t_of, (zoom,), (torch.ones_like(zoom),))
    axes[2].plot(t_of(zoom), dz)
    axes[2].set_xlabel("t_SD(tau)"), axes[2].set_ylabel("dt_SD / dtau")
    axes[2].set_title("dt_SD / dtau near t = 500: jumps at integers")
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## 2. The tangent on Gaussian data, where the exact consistency map is known

    Take $x_0 \sim \mathcal N(\mu, c^2 I)$ in 2-D. Every marginal is $\mathcal N(\cos\tau\,\mu, s_\tau^2 I)$ with
    $s_\tau^2 = c^2\cos^2\tau + \sin^2\tau$, and the PF-ODE keeps the standardised coordinate
    $(x - \cos\tau\,\mu)/s_\tau$ fixed. So the teacher's velocity and the exact consistency map are

    $$\frac{dx}{d\tau} = -\sin\tau\,\mu + \frac{(1 - c^2)\sin\tau\cos\tau}{s_\tau^2}\,(x - \cos\tau\,\mu),
      \qquad f^*(x, \tau) = \mu + c\,\frac{x - \cos\tau\,\mu}{s_\tau},
      \qquad F^* = \frac{\cos\tau\, x - f^*}{\sin\tau}.$$

    The velocity is also what the project's teacher chain gives: the exact noise prediction of
    `solvers/gaussian.py` at the float timestep $t_{SD}(\tau)$, converted with `F_from_raw`. For $F^*$
    the tangent must vanish to rounding; a model $F_{c'}$ built the same way with a *wrong* $c'$
    gets $g \ne 0$.
    """),
    code("""
    from solvers.gaussian import GaussianData

    MU, C = torch.tensor([0.7, -0.3], dtype=torch.float64), 0.6
    gauss = GaussianData(MU, torch.full((2,), C, dtype=torch.float64), S)
    col = lambda v: v[:, None]                          # (B,) -> (B, 1) against x (B, 2)


    def s_tau(tau, c):
        return torch.sqrt(c**2 * torch.cos(tau) ** 2 + torch.sin(tau) ** 2)


    def velocity(x, tau):
        \"\"\"The exact PF-ODE velocity dx/dtau of N(MU, C^2 I) (TrigFlow, sigma_d = 1).\"\"\"
        c, s = col(torch.cos(tau)), col(torch.sin(tau))
        return -s * MU + (1 - C**2) * s * c / col(s_tau(tau, C)) ** 2 * (x - c * MU)


    def f_map(x, tau, c):
        \"\"\"mu + c (x - cos tau mu) / s_tau(c): the exact consistency map for c = C.\"\"\"
        return MU + c * (x - col(torch.cos(tau)) * MU) / col(s_tau(tau, c))


    def F_model(c):
        \"\"\"F(x, tau) with f = cos x - sin F equal to f_map(., ., c): F* for c = C.\"\"\"
        return lambda x, tau: (col(torch.cos(tau)) * x - f_map(x, tau, c)) / col(torch.sin(tau))


    gen = torch.Generator().manual_seed(0)
    B = 512
    tau = tf.sample_tau(B, gen, tau_min=lo, tau_max=hi)          # sCM's time proposal on SD's tau range
    x0 = MU + C * torch.randn(B, 2, generator=gen, dtype=torch.float64)
    x = col(torch.cos(tau)) * x0 + col(torch.sin(tau)) * torch.randn(B, 2, generator=gen, dtype=torch.float64)
    dxdt = velocity(x, tau)

    eps_hat = gauss.eps(x, col(tf.t_of_tau(tau, S)))             # the Gaussian "teacher" at float t_SD(tau)
    print(f"max |dx/dtau - F_from_raw(eps_hat)|     = {(dxdt - tf.F_from_raw(eps_hat, x, tau, 'epsilon')).abs().max():.1e}")
    t_a, t_b = tf.t_of_tau(tau, S), tf.t_of_tau(0.5 * tau, S)    # f* is constant along the exact ODE
    x_b = gauss.flow(x, col(t_a), col(t_b))
    print(f"max |f*(x_tau) - f*(x_tau/2)|           = {(f_map(x, tau, C) - f_map(x_b, 0.5 * tau, C)).abs().max():.1e}")
    print(f"max |consistency_fn(F*) - f*|           = "
          f"{(tf.consistency_fn(F_model(C)(x, tau), x, tau) - f_map(x, tau, C)).abs().max():.1e}")

    cs = torch.cos(tau) * torch.sin(tau)


    def tangent_of(F_fn, method="autograd"):
        \"\"\"g = cos tau df-/dtau for F_fn, as scm_loss computes it (before normalisation, r = 1).\"\"\"
        F_minus, dF = jvp(F_fn, (x, tau), (col(cs) * dxdt, cs), method=method)
        return tf.tangent(F_minus, dF, x, tau, dxdt)


    g_star = tangent_of(F_model(C))
    print(f"\\nexact map c' = {C}:  max |g| = {g_star.abs().max():.1e}   (max |x| = {x.abs().max():.1f})")
    for c_wrong in (0.4, 0.9):
        g = tangent_of(F_model(c_wrong))
        back = F_model(C)(x, tau) - F_model(c_wrong)(x, tau)     # the step F should take
        cos_sim = (g * back).sum(1) / (g.norm(dim=1) * back.norm(dim=1))
        print(f"wrong map c' = {c_wrong}: rms |g| = {g.pow(2).mean().sqrt():.3f}; "
              f"cosine(g, F* - F_c') per sample: min {cos_sim.min():.6f}, max {cos_sim.max():.6f}")
    """),
    md(r"""
    The tangent of a wrong model points exactly back toward $F^*$ here: along the ODE both $g$ and
    $F^* - F_{c'}$ are multiples of the same standardised coordinate, with the sign of $c - c'$.
    `scm_loss` turns it into a regression target, $\lVert F_\theta - \mathrm{sg}(F_\theta) - g/(\lVert g\rVert + 0.1)\rVert^2$,
    whose gradient moves $F_\theta$ along $g$. With a one-parameter model $F_{c'}$ a few Adam steps on
    `scm_loss` (fresh samples each step, the JVP by forward-mode AD) recover $c$:
    """),
    code("""
    c_param = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([c_param], lr=0.05)
    F_theta = lambda x, tau: F_model(c_param)(x, tau)
    hist, gen = [], torch.Generator().manual_seed(1)
    with torch.enable_grad():
        for step in range(120):
            tau_b = tf.sample_tau(256, gen, tau_min=lo, tau_max=hi)
            x0_b = MU + C * torch.randn(256, 2, generator=gen, dtype=torch.float64)
            x_b = col(torch.cos(tau_b)) * x0_b + col(torch.sin(tau_b)) * torch.randn(256, 2, generator=gen, dtype=torch.float64)
            loss, info = tf.scm_loss(F_theta, jvp, x_b, tau_b, velocity(x_b, tau_b))
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            hist.append((c_param.item(), info["g_norm"].mean().item()))
    print(f"start:    c' = 1.50000")
    for step in (0, 10, 20, 40, 80, 119):
        print(f"step {step:3d}: c' = {hist[step][0]:.5f}   mean rms ||g|| = {hist[step][1]:.2e}")
    print(f"true c = {C}")

    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.7))
    gen = torch.Generator().manual_seed(2)
    taus = torch.linspace(hi, 0.0, 60, dtype=torch.float64)
    starts = torch.cos(taus[0]) * MU + s_tau(taus[0], C) * torch.randn(12, 2, generator=gen, dtype=torch.float64)
    z_std = (starts - torch.cos(taus[0]) * MU) / s_tau(taus[0], C)   # the ODE keeps this fixed
    paths = torch.stack([torch.cos(tk) * MU + s_tau(tk, C) * z_std for tk in taus])    # (60, 12, 2)
    for i in range(12):
        axes[0].plot(paths[:, i, 0], paths[:, i, 1], color="C0", lw=0.7)
    ends = f_map(starts, taus[0].repeat(12), C)
    wrong = f_map(starts, taus[0].repeat(12), 0.9)
    axes[0].plot(ends[:, 0], ends[:, 1], "o", ms=3, color="C0", label="f*(x_tau_max) = ODE end")
    axes[0].plot(wrong[:, 0], wrong[:, 1], "x", ms=4, color="C3", label="f with c' = 0.9")
    axes[0].set_title("PF-ODE paths from tau_max to 0"), axes[0].legend(fontsize=6), axes[0].set_aspect("equal")
    axes[0].set_xlabel("x_1"), axes[0].set_ylabel("x_2")
    axes[1].plot([h[0] for h in hist], label="c'")
    axes[1].axhline(C, color="gray", ls="--", label="true c")
    axes[1].set_xlabel("Adam step on scm_loss"), axes[1].set_ylabel("model parameter c'")
    axes[1].set_title("a one-parameter F_c' trained by scm_loss"), axes[1].legend(fontsize=6)
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    ## 3. The JVP through a UNet, next to finite differences

    In training, $F_\theta(x, \tau)$ is the UNet at $(x, t_{SD}(\tau))$ with its $\epsilon$-output converted
    by `F_from_raw`, all inside the differentiated function (as `SCM.F_net` builds it). `jvp`
    computes $(F, J_F\, v)$ for the tangent $v = (\cos\tau\sin\tau\, dx/d\tau,\ \cos\tau\sin\tau)$ by
    forward-mode AD (`method="autograd"`, exact) or by the central difference
    $[F(p + h v) - F(p - h v)]/2h$ (`method="fd"`, error $O(h^2)$ while $p \pm h v$ stays on one smooth
    piece of $t_{SD}$). Below: the tiny SD-architecture UNet of the tests (float64, random weights),
    two samples at $t_{SD} = 377.5$ and $41.5$ (half-way between knots), the teacher velocity taken
    from the same network.
    """),
    code("""
    from models.unet import UNetModel

    TINY = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
                transformer_depth=[1, 1], transformer_depth_middle=1, num_heads=2, context_dim=32,
                use_linear_in_transformer=True)       # conf/experiment/smoke.yaml model.unet, as tests/test_jvp.py
    torch.manual_seed(0)
    unet = UNetModel(**TINY).double().eval()
    for p in unet.parameters():                         # LDM zero-inits output layers: make every weight count
        p.add_(0.05 * torch.randn_like(p))
    ctx = torch.randn(2, 3, 32, dtype=torch.float64)


    def F_unet(x, tau):
        \"\"\"F_theta(x, tau) = F_from_raw(UNet(x, t_SD(tau))), eps-prediction, sigma_d = 1 (SCM.F_net).\"\"\"
        return tf.F_from_raw(unet(x, tf.t_of_tau(tau, S), ctx), x, tau, "epsilon")


    xu = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    tau_u = tf.tau_of_t(torch.tensor([377.5, 41.5], dtype=torch.float64), S)
    cs_u = torch.cos(tau_u) * torch.sin(tau_u)
    v_u = F_unet(xu, tau_u)                             # dx/dtau of a "teacher": the same net
    primals, tangents = (xu, tau_u), (cs_u[:, None, None, None] * v_u, cs_u)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()

    _, d_ad = jvp(F_unet, primals, tangents)            # forward-mode AD: the reference
    _, d_x = jvp(F_unet, primals, (tangents[0], torch.zeros_like(cs_u)))
    print(f"|JVP| = {d_ad.norm():.3f}; its x part {d_x.norm():.3f}, its tau part {(d_ad - d_x).norm():.3f}")


    def central(h):
        \"\"\"[F(p + h v) - F(p - h v)] / 2h, written out.\"\"\"
        plus, minus = (F_unet(*(p + sgn * h * v for p, v in zip(primals, tangents))) for sgn in (1, -1))
        return (plus - minus) / (2 * h)


    hs = [3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6]
    errs = [rel(central(h), d_ad) for h in hs]
    print("\\n      h   max |dt_SD|   rel. error vs autograd   error ratio per step")
    for i, (h, e) in enumerate(zip(hs, errs)):
        dt = (tf.t_of_tau(tau_u + h * cs_u, S) - tf.t_of_tau(tau_u, S)).abs().max()
        ratio = f"{errs[i - 1] / e:6.2f}  (h ratio {hs[i - 1] / h:.2f})" if i else ""
        print(f"{h:7.0e}   {dt:10.4f}   {e:22.2e}   {ratio}")

    for fd_eps in (1e-3, 1e-5):
        _, d_fd = jvp(F_unet, primals, tangents, method="fd", fd_eps=fd_eps)
        h = fd_step(primals, tangents, fd_eps).item()
        print(f"\\njvp(method='fd', fd_eps={fd_eps:g}): h = {h:.2e}, rel. error {rel(d_fd, d_ad):.2e}")
    g_ad = tf.tangent(F_unet(xu, tau_u), d_ad, xu, tau_u, v_u)
    g_fd = tf.tangent(F_unet(xu, tau_u), d_fd, xu, tau_u, v_u)
    print(f"the tangent g from fd (fd_eps=1e-5) vs autograd: rel. error {rel(g_fd, g_ad):.2e}")

    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    ax.loglog(hs, errs, "o-", label="central difference")
    ref = [errs[4] * (h / hs[4]) ** 2 for h in hs]
    ax.loglog(hs, ref, "--", color="gray", label="slope 2")
    ax.set_xlabel("h (step along the tangent)"), ax.set_ylabel("rel. error vs forward AD")
    ax.set_ylim(min(errs) / 3, max(errs) * 3), ax.legend(fontsize=6)
    ax.set_title("finite-difference JVP through the tiny UNet")
    fig.tight_layout()
    plt.show()
    """),
    md(r"""
    Reading the table: once $t_{SD}$ moves by less than the half step to the next knot, the error falls
    by $\approx 10$ per factor $\sqrt{10}$ in $h$ (second order; float64 rounding, about $10^{-16}/h$, is
    still far below). For $h \ge 10^{-2}$, $p \pm h v$ crosses integer timesteps, where $t_{SD}(\tau)$ has a
    kink, and the time embedding's fastest sinusoids turn over within the step: the quotient is
    useless. Most of the JVP is its $\tau$ part, amplified by $dt_{SD}/d\tau$. `jvp(method="fd")` picks $h$
    from `fd_eps` relative to the primals; its default `fd_eps = 1e-3` moves $t_{SD}$ by almost half a
    step here and is off by a few per cent; the tangent $g$ inherits the JVP's relative error.

    ## 4. LCD's skipping step $k$ as $k \to 0$

    LCD (docs/method.md Sec. 3) compares the student at $t_{n+k}$ with the target at the point one
    teacher ODE step of $k$ timesteps earlier, $\hat x_{t_n}$:

    $$\mathcal L_k = d\big(f_\theta(x_{t_{n+k}}, t_{n+k}),\ f_{\theta^-}(\hat x_{t_n}, t_n)\big).$$

    With $\Delta\tau = \tau(t_{n+k}) - \tau(t_n)$ and an exact ODE step, the difference is a backward
    difference quotient along the trajectory:

    $$\frac{f_{\theta^-}(x_{t_{n+k}}, \tau_{n+k}) - f_{\theta^-}(\hat x_{t_n}, \tau_n)}{\Delta\tau}
      = \frac{d f_{\theta^-}}{d\tau} + O(\Delta\tau) = \frac{g}{\cos\tau} + O(\Delta\tau).$$

    So the squared-error loss scales as $\Delta\tau^2$ and its gradient as $\Delta\tau$. Divided by $\Delta\tau$,
    the $\ell_2$ LCD gradient (the project's `distance(..., "l2")`, a mean over $D$ coordinates) tends to
    $\frac{2}{D} \big(\frac{df^-}{d\tau}\big)^{\top} \partial_\theta f_\theta
      = -\frac{2}{D}\tan\tau\; g^\top \partial_\theta F_\theta$: $\tan\tau$ times the gradient of `scm_loss`
    before its normalisation $g / (\lVert g \rVert + c)$ (sCM's argument for the continuous-time loss). Below: the Gaussian,
    the wrong model $c' = 0.9$ (at the exact map both sides are 0), $t_{n+k} = 499$, $k$ from 50 (LCD's is 20) down
    to fractions of a step on the float timestep, the ODE step taken exactly (`GaussianData.flow`); the
    last column, $\mathcal L_k / \Delta\tau^2$, tends to $\lVert df^-/d\tau \rVert^2 / D$.
    """),
    code("""
    from lcm.objectives.losses import distance
    from solvers.ddim import ddim_step

    C_WRONG, T_NK, B4 = 0.9, 499, 64
    gen = torch.Generator().manual_seed(3)
    x0 = MU + C * torch.randn(B4, 2, generator=gen, dtype=torch.float64)
    x_nk = S.add_noise(x0, torch.randn(B4, 2, generator=gen, dtype=torch.float64), T_NK)
    tau_nk = tf.tau_of_t(T_NK, S).repeat(B4)

    # The continuous-time side: the tangent (project JVP + tangent) and the unnormalised scm_loss gradient.
    c_param = torch.tensor(C_WRONG, dtype=torch.float64, requires_grad=True)
    F_theta = lambda x, tau: F_model(c_param)(x, tau)
    v_nk = velocity(x_nk, tau_nk)
    cs4 = torch.cos(tau_nk) * torch.sin(tau_nk)
    F_minus, dF = jvp(F_theta, (x_nk, tau_nk), (col(cs4) * v_nk, cs4))
    df_dtau = tf.tangent(F_minus, dF, x_nk, tau_nk, v_nk) / col(torch.cos(tau_nk))
    with torch.enable_grad():
        loss, info = tf.scm_loss(F_theta, jvp, x_nk, tau_nk, v_nk, c=0.1)
        (grad_scm,) = torch.autograd.grad((loss * (info["g_norm"] + 0.1)).mean(), c_param)   # undo g / (||g|| + c)
    grad_cont = torch.tan(tau_nk[0]) * grad_scm

    print(f"t_n+k = {T_NK}, tau = {tau_nk[0]:.5f};  continuous: |df/dtau| rms {df_dtau.pow(2).mean().sqrt():.4f}, "
          f"tan(tau) * grad(scm_loss) = {grad_cont:.6f}")
    print("\\n      k      dtau     rel.err(df/dtau)   err / dtau   DDIM x_hat: rel.err   rel.err(grad / dtau)"
          "   loss / dtau^2")
    for k in (50, 20, 5, 1, 0.1, 0.01, 0.001):
        t_n = T_NK - k                                 # an integer step for integer k, a float t below
        tau_n = tf.tau_of_t(t_n, S).repeat(B4)
        dtau = (tau_nk[0] - tau_n[0]).item()
        x_hat = gauss.flow(x_nk, T_NK, t_n)           # exact ODE step t_n+k -> t_n (the ideal teacher solver)
        with torch.enable_grad():
            f_student = f_map(x_nk, tau_nk, c_param)
            f_target = f_map(x_hat, tau_n, c_param).detach()
            lcd = distance(f_student, f_target, "l2").mean()
            (grad_lcd,) = torch.autograd.grad(lcd, c_param)
        q = (f_student.detach() - f_target) / dtau
        e = rel(q, df_dtau)
        x_ddim = ddim_step(x_nk, gauss.eps(x_nk, T_NK), T_NK, t_n, S)   # one DDIM step of the exact teacher instead
        e_ddim = rel((f_student.detach() - f_map(x_ddim, tau_n, C_WRONG)) / dtau, df_dtau)
        print(f"{k:7g}  {dtau:.2e}   {e:14.2e}   {e / dtau:10.3f}   {e_ddim:17.2e}   "
              f"{abs(grad_lcd / dtau / grad_cont - 1):18.2e}   {lcd.item() / dtau**2:12.6f}")
    print(f"{'0':>7}  {'':8}   {'':14}   {'':10}   {'':17}   {'':18}   {df_dtau.pow(2).mean().item():12.6f}"
          "  (mean ||df/dtau||^2 / D)")
    """),
    md(r"""
    The error of the difference quotient falls linearly with $\Delta\tau$ (err / $\Delta\tau$ is constant):
    LCD's target difference is a first-order finite-difference estimate of sCM's tangent, taken along the
    teacher's own ODE step. At LCD's $k = 20$ it is already within a few per cent here; the continuous
    objective removes that bias, needs no ODE solver step (only the teacher's velocity at one point),
    and pays with a JVP through the network, the time embedding included (Sec. 1's $dt_{SD}/d\tau$).
    With a DDIM step instead of the exact one, $\hat x_{t_n}$ carries an extra $O(\Delta\tau^2)$ solver error,
    which divided by $\Delta\tau$ is again $O(\Delta\tau)$: same limit.
    """),
]

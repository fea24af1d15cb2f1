"""Source of notebooks/lcd_step.ipynb: 3. One LCD step."""
from nbcells import SETUP, code, md

#----------------------------------------------------------------------------
# 3. One LCD step.

CELLS = [
    md(r"""
    # One Latent Consistency Distillation step, line by line

    Algorithm 1 of the LCM-LoRA report (docs/method.md Sec. 3), for one batch:

    ```
    sample (z, c) ~ D_z,  n ~ U[1, N - k],  w ~ U[w_min, w_max]
    z_{t_{n+k}} ~ N(alpha(t_{n+k}) z, sigma(t_{n+k})^2 I)
    z_hat_{t_n} <- z_{t_{n+k}} + (1+w) Psi(z_{t_{n+k}}, t_{n+k}, t_n, c) - w Psi(z_{t_{n+k}}, t_{n+k}, t_n, uncond)
    L <- d( f_theta(z_{t_{n+k}}, w, c, t_{n+k}),  f_theta_minus(z_hat_{t_n}, w, c, t_n) )
    theta <- theta - eta grad L;   theta_minus <- stopgrad(mu theta_minus + (1 - mu) theta)
    ```

    For an LCM-LoRA the three networks are one UNet (docs/method.md Sec. 3.2): the **student** is the
    LoRA UNet, the **target** $\theta^-$ is the same UNet under `no_grad` ($\mu = 0$), the
    **teacher** is the UNet with adapters disabled. The loss itself is `lcm/objectives/losses.py`; this
    notebook calls its pieces one at a time and checks the result against `lcd_loss`.
    """),
    code(SETUP),
    code("""
    from demo import world
    from lcm.consistency import boundary_scalings, f_theta
    from lcm.objectives.base import LoRAConfig
    from lcm.denoiser import unet_net
    from lcm.objectives.losses import distance, draw_points, lcd_loss
    from lcm.objectives.teacher import teacher_estimate
    from lcm.objectives.lcd_lora import LCDLoRA
    from lcm.pipeline import Pipeline
    from models.text import Conditioning
    from solvers.ddim import ddim_from_x0_eps, ddim_step
    from solvers.schedule import lcm_grid
    from solvers.wrappers import cfg, to_eps, to_x0

    pipe = Pipeline.from_checkpoint(os.path.join(DEMO, "demo_teacher.safetensors"))
    S, pred_type = pipe.schedule, pipe.prediction_type
    # The trainer's networks for objective=lcd_lora, continuing from the demo LCM-LoRA (fp32, trainable).
    roles = LCDLoRA(LoRAConfig(name="lcm", init_from=os.path.join(DEMO, "demo_lcm_lora.safetensors")))
    roles.setup(pipe)
    assert roles.student is roles.target is roles.teacher   # one UNet in memory

    student = unet_net(roles.student)                  # net(x, t, cond, w) -> raw UNet output (no w input)
    target = unet_net(roles.target)                    # called under no_grad (mu = 0)
    teacher = unet_net(roles.teacher, roles.teacher_ctx)   # the same UNet with adapters disabled
    """),
    md(r"""
    ## Step 1: encode, $z = \text{vae\_scale} \cdot E(x)$

    A posterior *sample*, not the mean. $c$ is the encoded caption; the unconditional embedding is
    the encoded empty prompt (SD1/SD2 and the demo model).
    """),
    code("""
    pairs = [world.sample(seed=0, index=i, resolution=pipe.default_size) for i in (3, 8)]
    x = torch.stack([img for _, img in pairs])                     # (B, 3, H, W) in [-1, 1]
    captions = [world.caption(a) for a, _ in pairs]
    z = pipe.vae.encode(x).sample(generator=torch.Generator().manual_seed(0)) * pipe.vae_scale
    cond = Conditioning(pipe.encode_prompt(captions).context)
    uncond = Conditioning(pipe.encode_prompt([""] * len(captions)).context)
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
    2. **The module** (`teacher_estimate`): combine $\hat x_0^w = \hat x_0^c + w(\hat x_0^c - \hat x_0^\varnothing)$ and
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
    z_hat = teacher_estimate(teacher, S, pred_type)(z_nk, t_nk, t_n, z, eps, cond, uncond, w)  # 2.
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
        ref, info = lcd_loss(student, target, teacher_estimate(teacher, S, pred_type), z, cond, uncond, S,
                             torch.Generator().manual_seed(SEED), k=K, w_min=W_MIN, w_max=W_MAX, loss="huber",
                             huber_c=1e-3, prediction_type=pred_type, sigma_data=pipe.spec.sigma_data,
                             timestep_scaling=pipe.spec.timestep_scaling)
    print("traced loss:", loss.tolist())
    print("lcd_loss:   ", ref.tolist())
    print("l2 instead: ", distance(pred, target_f, "l2").tolist())
    assert torch.equal(info["t_nk"], t_nk) and torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    lat = torch.stack([z, z_nk, z_hat, target_f, pred.detach()], 1).flatten(0, 1)   # (B * 5, 4, h, w)
    show_grid(pipe.decode(lat), [f"t_nk={a}, t_n={b}" for a, b in zip(t_nk.tolist(), t_n.tolist())],
              ["z (clean)", "z at t_nk", "z_hat at t_n", "target", "student"], size=1.0,
              title="one LCD step per sample (decoded latents)")
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
        after, _ = lcd_loss(student, target, teacher_estimate(teacher, S, pred_type), z, cond, uncond, S,
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
    z1, e1, c1, u1 = z[:1], eps[:1], Conditioning(cond.context[:1]), Conditioning(uncond.context[:1])
    zt = S.add_noise(z1, e1, torch.tensor([T_NK]))
    estimate = teacher_estimate(teacher, S, pred_type)
    pred1 = f_theta(zt, to_x0(student(zt, torch.tensor([T_NK]), c1, None), zt, T_NK, S, pred_type), T_NK, pipe.spec)


    def target_at(k, w):
        \"\"\"Targets (n, 4, h, w) for n settings of (k, w) from the same z_{t_{n+k}}.\"\"\"
        n = len(k)
        t_nk_, t_n_ = torch.full((n,), T_NK), (T_NK - torch.tensor(k)).clamp(min=0)   # the grid rule of draw_points
        cn, un = Conditioning(c1.context.expand(n, -1, -1)), Conditioning(u1.context.expand(n, -1, -1))
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
    axes[0].set_xlabel(f"w (k = {K})"), axes[0].set_ylabel("loss / relative change"), axes[0].legend(fontsize=6)
    axes[0].set_title("moving the guidance w")
    axes[1].plot(KS, distance(pred1.expand_as(tk), tk, "huber"), "o-", label="loss d(student, target)")
    axes[1].set_xscale("log"), axes[1].set_xlabel("k (w = 7.5)"), axes[1].set_ylabel("pseudo-Huber loss")
    axes[1].set_title("moving the skipping step k"), axes[1].legend(fontsize=6)
    fig.suptitle(f"t_{{n+k}} = {T_NK}: '{captions[0]}'")
    fig.tight_layout()
    plt.show()
    show_grid(pipe.decode(torch.cat([pred1, tw])), [f"k = {K}"], ["student"] + [f"target, w={v:g}" for v in WS], size=1.0,
              title=f"the target as w moves (t_n+k = {T_NK})")
    show_grid(pipe.decode(torch.cat([pred1, tk])), ["w = 7.5"], ["student"] + [f"target, k={v}" for v in KS], size=1.0,
              title=f"the target as k moves (t_n+k = {T_NK})")
    """),
]

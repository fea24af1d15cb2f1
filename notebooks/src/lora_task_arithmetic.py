"""Source of notebooks/lora_task_arithmetic.ipynb: 4. LoRA task arithmetic."""
from nbcells import SETUP, code, md

#----------------------------------------------------------------------------
# 4. LoRA task arithmetic.

CELLS = [
    md(r"""
    # LoRA and task arithmetic: the acceleration vector

    A LoRA adds a low-rank update to a frozen weight (docs/method.md Sec. 5):

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
    ax.set_xlabel("index"), ax.set_ylabel("singular value of dW"), ax.legend(fontsize=6)
    ax.set_title("singular values of one module's dW: r non-zero, then rounding")
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
    LCM in 4 steps at $s = 1$. The style vector controls the style at every $\lambda_2$. The demo world
    is easy enough that its base model already samples it in 4 LCM steps (the $\lambda_2 = 0$ column),
    so this grid shows that the two vectors add without interfering, not the acceleration itself; the
    one-step gap between teacher and LCM is in the consistency_function notebook. Titles: how many images of a
    fixed set of 8 prompts the demo evaluator recognises as "outlined" (a count of 8: read 4/8 against
    6/8 as a weak difference); the image shown is the first prompt's.
    """),
    code("""
    from demo import world
    from demo.evaluator import DemoEvaluator

    evaluator = DemoEvaluator.load(os.path.join(DEMO, "demo_evaluator.safetensors"))
    STYLE = "outlined"
    PROMPTS = world.fixed_prompt_set(8)
    L1, L2 = [0.0, 0.5, 0.8, 1.0], [0.0, 0.5, 1.0]

    cells, accs = [], []
    for l1 in L1:
        for l2 in L2:
            pipe.set_lora_scales({"style": l1, "lcm": l2})        # W0 + l1 dW_style + l2 dW_lcm
            imgs = pipe(PROMPTS, steps=4, solver="lcm", seed=0, output="tensor", progress=False)
            cells.append(imgs[0])
            accs.append(evaluator.style_accuracy(imgs * 2 - 1, STYLE))

    n = len(PROMPTS)
    fig, axes = plt.subplots(len(L1), len(L2), figsize=(1.5 * len(L2) + 0.9, 1.5 * len(L1) + 0.6), squeeze=False)
    for ax, img, acc, (l1, l2) in zip(axes.flat, cells, accs, [(a, b) for a in L1 for b in L2]):
        ax.imshow(img.permute(1, 2, 0).numpy()), ax.set_xticks([]), ax.set_yticks([])
        head = f"LCM λ2 = {l2:g}\\n" if l1 == L1[0] else ""          # column label on the top row
        ax.set_title(f"{head}{STYLE}: {round(acc * n)}/{n}", fontsize=7)
        if l2 == L2[0]:
            ax.set_ylabel(f"style λ1 = {l1:g}", fontsize=7)           # row label
    fig.suptitle(f"LCM 4 steps, s = 1; image: '{PROMPTS[0]}'\\n"
                 f"count: images of the {n} prompts the evaluator calls {STYLE}")
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
    show_grid(imgs, [f"style 0.8\\nDPM++ s={BASE_S:g}"],
              [f"{n} steps\\n{STYLE}: {round(a * len(PROMPTS))}/{len(PROMPTS)}" for n, a in zip(BASE_STEPS, accs)],
              size=1.3, title="style LoRA alone, DPM-Solver++(2M) with CFG")
    """),
]

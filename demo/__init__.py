"""The demo world: a procedural text-to-image world, its evaluator, and the recipes of the bundled
demo weights (assets/demo_*.safetensors). Not part of the core packages: lcm/, models/ and solvers/
never import it (tests/test_layering.py).

    world      coloured shapes with captions, generated from (seed, index); DemoDataset
    evaluator  the CNN that plays CLIP score (prompt accuracy) and FID (Frechet distance)
    arch       the demo teacher's and the demo VAE's architectures
    text       the caption pretraining of the teacher's text tower
    vae        the demo VAE's training, and the untrained teacher file
    bench      the LCM table in miniature (docs/demo_results.md)
    sweep      LCM-LoRA vs the skipping step k and the LoRA rank (docs/demo_sweep.md)
"""

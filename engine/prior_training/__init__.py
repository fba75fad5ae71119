"""Training a small learned prior for the quality harness (issue 16); not imported by the engine at run time.

A procedural world of colored shapes (`world`), rendered by the harness's own ray caster and the
renderer's shading; a small latent diffusion model in diffusers layout trained on it (`models`,
`train`), loadable by `realfusion reconstruct --model FOLDER` through the same `from_pretrained` code
as Stable Diffusion. Run it with `scripts/train_prior`.
"""

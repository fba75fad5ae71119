"""Quality harness: synthetic objects with known shape and texture, an oracle prior, and scoring.

Stable Diffusion cannot be downloaded here, so the pipeline is also proven against ground truth:
an object whose geometry and colors are known is photographed from the reference camera, the
normal pipeline reconstructs it with an *oracle* prior (which knows what the object looks like from
any view), and the result is scored as in the paper (F-score at 0.05, Chamfer, PSNR).
"""
